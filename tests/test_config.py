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
    """Every setting spelled out, so that loratag's own defaults (tuned by the study) never leak into the guide."""
    path = Path(__file__).parents[1] / "configs/bionlp2004-guide.json"
    cfg = Config.load(path)
    guide = Config(
        model="roberta-large",
        data="tner/bionlp2004",
        lora=LoraSettings(r=16, alpha=16, dropout=0.1, bias="all", target_modules=None, top_layers=None, rslora=False),
        train=TrainConfig(
            lr=1e-3,
            batch_size=16,
            epochs=10,
            min_steps=0,
            case=False,  # the guide reads token types as the tokenizer gives them (RoBERTa: one type)
            head_init="random",
            crf=False,  # the guide's head is softmax only
            weight_decay=0.01,
            warmup_ratio=0.0,
            precision="fp32",
            length_grouping=False,
            eval_batch_size=16,
            lora_plus_ratio=1.0,
            low_precision_weights=False,
            decode="argmax",
            time_budget=None,
        ),
    )
    assert cfg == guide
    written = json.loads(path.read_text())
    assert set(written["lora"]) == set(json.loads(json.dumps(guide.to_dict()))["lora"])  # no field left to defaults
    assert set(written["train"]) == set(guide.to_dict()["train"])


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
