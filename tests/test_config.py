import json
from dataclasses import replace
from pathlib import Path

import pytest

from loratag.config import Config, LoraSettings, TrainConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.json"))


def test_roundtrip(tmp_path):
    cfg = Config(model="x", data="d", lora=LoraSettings(target_modules=("query", "value")), train=TrainConfig(lr=5e-4))
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["format"] == "loratag-run.v1"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    assert isinstance(Config.load(path), Config)


def test_guide_config_is_the_guide():
    cfg = Config.load(Path(__file__).parents[1] / "configs/bionlp2004-guide.json")
    assert (cfg.model, cfg.data) == ("roberta-large", "tner/bionlp2004")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (16, 16, 0.1, "all")
    t = cfg.train
    assert (t.lr, t.batch_size, t.epochs, t.weight_decay, t.precision, t.length_grouping) == (
        1e-3,
        16,
        10,
        0.01,
        "fp32",
        False,
    )


@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda: LoraSettings(r=0), "--lora-r"),
        (lambda: LoraSettings(dropout=1.0), "--lora-dropout"),
        (lambda: LoraSettings(bias="some"), "--bias"),
        (lambda: TrainConfig(lr=0), "--lr"),
        (lambda: TrainConfig(warmup_ratio=1.5), "--warmup-ratio"),
        (lambda: TrainConfig(precision="int4"), "--precision"),
        (lambda: TrainConfig(max_length=4), "--max-length"),
    ],
)
def test_bad_values_name_the_flag(make, flag):
    with pytest.raises(ValueError, match=flag):
        make()


def test_unknown_key_and_bad_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": "m", "train": {"learning_rate": 1}}))
    with pytest.raises(ValueError, match="learning_rate"):
        Config.load(p)
    p.write_text('{"model": "m",\n "train": }')
    with pytest.raises(ValueError, match=r"c.json:2"):
        Config.load(p)


def test_target_modules_from_csv():
    assert LoraSettings(target_modules="query, value").target_modules == ("query", "value")
    assert replace(Config(), lora=LoraSettings(target_modules=["a"])).lora.target_modules == ("a",)
