"""loratag average: the mean of several runs' updates as one plain PEFT adapter, exactly."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from loratag.cli import main
from loratag.tagger import Tagger
from loratag.train import train

from .conftest import tagging_cfg


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory, tiny_bert):
    cfg = tagging_cfg(tiny_bert)
    root = tmp_path_factory.mktemp("seeds")
    runs = []
    for seed, r in ((1, 4), (2, 4), (3, 2)):  # ranks may differ
        c = replace(
            cfg, lora=replace(cfg.lora, r=r, alpha=2.0 * r + seed), train=replace(cfg.train, epochs=2, seed=seed)
        )
        runs.append(train(c, root / f"s{seed}", progress=False))
    return runs


def _merged_state(path):
    model = Tagger.load(path, precision="fp32").model  # LoRA merged into the base, head and biases in place
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_average_is_the_mean_of_the_merged_models_and_loads_as_plain_peft(seed_runs, tmp_path, capsys, tiny_bert):
    out = tmp_path / "soup"
    assert main(["average", *map(str, seed_runs), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["lora_rank"] == 10 and 0 <= summary["test"]["f1"] <= 1
    states = [_merged_state(r) for r in seed_runs]
    soup = _merged_state(out)
    for name, value in soup.items():
        mean = sum(s[name] for s in states) / len(states)
        torch.testing.assert_close(value, mean, atol=1e-5, rtol=1e-5, msg=name)
    # the guide's reload code: PeftModel.from_pretrained on the base
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    labels = json.loads((out / "labels.json").read_text())
    base = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=len(labels))
    peft = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    for name, value in peft.state_dict().items():
        torch.testing.assert_close(value, soup[name], atol=1e-5, rtol=1e-5, msg=name)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"validation", "test", "averaged_from"}
    # what the run says it is made of, and evaluate/predict take it like any run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"]["averaged_from"] == [str(r.resolve()) for r in seed_runs]
    assert main(["predict", str(out), "--text", "IL-2 gene expression requires NF-kappa B ."]) == 0


def test_module_lists_in_another_order_are_the_same_adapter(seed_runs, tmp_path):
    """PEFT writes target_modules from a set: two runs of one recipe list them in different orders."""
    from loratag.average import average_runs

    other = tmp_path / "other"
    shutil.copytree(seed_runs[1], other)
    acfg = json.loads((other / "adapter" / "adapter_config.json").read_text())
    acfg["target_modules"] = list(reversed(acfg["target_modules"]))
    (other / "adapter" / "adapter_config.json").write_text(json.dumps(acfg))
    assert average_runs([seed_runs[0], other], tmp_path / "avg", evaluate_splits=())["lora_rank"] == 8


def test_runs_that_cannot_be_averaged_are_refused(seed_runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(seed_runs[1], other)
    labels = json.loads((other / "labels.json").read_text())
    swapped = {k: len(labels) - 1 - v for k, v in labels.items()}  # the same labels, the head's rows in another order
    (other / "labels.json").write_text(json.dumps(swapped))
    assert main(["average", str(seed_runs[0]), str(other), "--out", str(tmp_path / "x")]) == 2
    assert "labels differ" in capsys.readouterr().err
    cfg = json.loads((other / "config.json").read_text())
    cfg["train"]["context"] = 8
    (other / "labels.json").write_text(json.dumps(labels))
    (other / "config.json").write_text(json.dumps(cfg))
    assert main(["average", str(seed_runs[0]), str(other), "--out", str(tmp_path / "y")]) == 2
    assert "train.context" in capsys.readouterr().err
    assert main(["average", str(seed_runs[0]), "--out", str(tmp_path / "z")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_runs_last_epoch_averages_with_its_kept_one(seed_runs, tmp_path):
    from loratag.average import average_runs

    run = seed_runs[0]
    metrics = average_runs([run, run / "last"], tmp_path / "epochs")
    assert metrics["lora_rank"] == 8 and "test" in metrics
