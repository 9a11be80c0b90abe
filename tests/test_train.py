import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loratag.cli import main
from loratag.config import Config
from loratag.tagger import Tagger
from loratag.train import train, train_and_load

from .conftest import RESOURCES

WORDS = [["IL-2", "gene", "expression", "requires", "NF-kappa", "B", "."], ["T", "cells", "express", "CD28", "."]]
RUN_FILES = {"config.json", "labels.json", "adapter", "last", "metrics.json", "README.md", "curves.png", "train.log"}


def plain_peft_logits(base_dir: Path, adapter_dir: Path, tagger: Tagger, words):
    """The guide's way: base model + PeftModel.from_pretrained, first sub-token of each word."""
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    base = AutoModelForTokenClassification.from_pretrained(base_dir, num_labels=len(tagger.labels))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    out = []
    for sent in words:
        enc = tagger.tokenizer(sent, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        ids, firsts = enc.word_ids(), []
        for pos, w in enumerate(ids):
            if w is not None and (pos == 0 or ids[pos - 1] != w):
                firsts.append(pos)
        out.append(logits[firsts])
    return out


@pytest.mark.parametrize(
    "base, bias",
    [("tiny_bert", "none"), ("tiny_bert", "all"), ("tiny_bert", "lora_only"), ("tiny_roberta", "all")],
)
def test_train_save_reload_identical(base, bias, request, tiny_cfg, tmp_path, capsys):
    base_dir = request.getfixturevalue(base)
    cfg = replace(
        tiny_cfg,
        model=str(base_dir),
        lora=replace(tiny_cfg.lora, bias=bias),
        train=replace(tiny_cfg.train, epochs=1, lr=0.05),
    )
    run, mem = train_and_load(cfg, tmp_path / "run", progress=False, stop_after_steps=3)
    assert not mem.model.training  # the returned Tagger predicts without dropout
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert {p.name for p in (run / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    expected = mem.word_logits(WORDS)
    loaded = Tagger.load(run).word_logits(WORDS)
    plain = plain_peft_logits(base_dir, run / "adapter", mem, WORDS)
    for e, a, p in zip(expected, loaded, plain):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)

    # the trained biases and head really came back (a base model or a random head would differ)
    from transformers import AutoModelForTokenClassification

    fresh = AutoModelForTokenClassification.from_pretrained(base_dir, num_labels=len(mem.labels))
    fresh_bias = dict(fresh.named_parameters())
    loaded_model = Tagger.load(run).model
    trained_biases = [
        n
        for n, p in loaded_model.named_parameters()
        if n.endswith("bias")
        and "classifier" not in n
        and not torch.equal(p, fresh_bias[n.replace("base_model.model.", "").replace(".base_layer", "")])
    ]
    assert bool(trained_biases) == (bias != "none")

    text = "IL-2 gene expression requires NF-kappa B."
    assert main(["predict", str(run), "--words", "--text", text]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines() if line]
    doc = mem.predict_text(text)
    assert printed == [[w.text, lab] for w, lab in zip(doc.words, doc.labels)]


def test_metrics_and_card(tiny_cfg, tmp_path):
    run = train(tiny_cfg, tmp_path / "run", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert m["best_epoch"] == max(m["epochs"], key=lambda e: e["validation"]["f1"])["epoch"]
    assert set(m["test"]) >= {"precision", "recall", "f1", "accuracy", "per_type", "mode"}
    assert "conlleval" in m["mode"]
    cfg_saved = json.loads((run / "config.json").read_text())
    assert Config.from_dict(cfg_saved) == tiny_cfg
    assert cfg_saved["run"]["trainable_params"] > 0
    card = (run / "README.md").read_text()
    assert "library_name: peft" in card and f"{m['test']['f1']:.4f}" in card
    assert f"| untyped (boundaries only) | {m['test']['untyped']['precision']:.4f}" in card
    log = (run / "train.log").read_text()
    assert "epoch 2/2" in log
    # typed and boundary-only (untyped) F1 side by side, each epoch and on test
    last = m["epochs"][-1]["validation"]
    assert f"F1 {last['f1']:.4f} untyped {last['untyped']['f1']:.4f}" in log
    assert f"F1 {m['test']['f1']:.4f} untyped {m['test']['untyped']['f1']:.4f}" in log


def test_existing_run_is_not_overwritten(tiny_cfg, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(tiny_cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "keep.txt").exists()


def test_long_sentences_are_windowed_not_truncated(tiny_cfg, tmp_path):
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, max_length=12, epochs=1))
    run, tagger = train_and_load(cfg, tmp_path / "run", progress=False, stop_after_steps=2)
    facts = json.loads((run / "config.json").read_text())["run"]
    assert facts["train_sentences_windowed"] > 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["test"]["words"] == sum(len(json.loads(x)["tokens"]) for x in open(RESOURCES / "tiny/test.json"))
    assert m["test"]["windowed_sentences"] > 0


def _big_data(tmp_path: Path) -> Path:
    """400 training sentences (the tiny ones repeated), so an epoch lasts long enough to be killed in."""
    d = tmp_path / "data"
    d.mkdir()
    lines = (RESOURCES / "tiny/train.json").read_text().splitlines()
    (d / "train.json").write_text("\n".join(lines * 50) + "\n")
    for name in ("validation.json", "test.json", "label.json"):
        (d / name).write_text((RESOURCES / "tiny" / name).read_text())
    return d


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "loratag", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw
    )


def test_sigkill_then_resume_gives_the_same_result(tiny_bert, tmp_path):
    data = _big_data(tmp_path)
    args = [
        "train",
        "--model",
        str(tiny_bert),
        "--data",
        str(data),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--lora-r",
        "4",
        "--lr",
        "5e-3",
        "--eval-batch-size",
        "8",
        "--checkpoint-minutes",
        "0.00001",
        "--precision",
        "fp32",  # compared exactly (auto is bf16 on CPUs with AMX / AVX-512-BF16)
    ]
    full = _cli([*args, "--out", str(tmp_path / "full")])
    assert full.wait(timeout=600) == 0, full.stderr.read().decode()

    killed = tmp_path / "killed"
    proc = _cli([*args, "--out", str(killed)])
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # a few more steps, then kill at an arbitrary point inside the epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    state = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert state["state"]["step_in_epoch"] > 0 or state["state"]["epoch"] > 0

    resumed = _cli(["train", "--out", str(killed), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for key in ("best_epoch", "best_validation_f1"):
        assert a[key] == b[key]
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert ea["validation"]["f1"] == eb["validation"]["f1"]
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-6, abs=1e-7)
    assert a["test"]["f1"] == b["test"]["f1"]
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full/adapter/adapter_model.safetensors")
    wb = load_file(killed / "adapter/adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    assert not (killed / "checkpoint.pt").exists()


def test_a_batch_whose_windows_own_no_words_gives_zero_loss():
    """Such a batch used to divide by zero (its global label count is 0); now it contributes nothing."""
    from loratag.encoding import IGNORE
    from loratag.train.session import token_loss

    logits = torch.randn(2, 5, 7, requires_grad=True)
    gold = torch.full((2, 5), IGNORE)
    loss, loss_sum = token_loss(logits, gold, divisor=0, world=2)
    assert loss.item() == 0.0 and loss_sum.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_token_loss_is_the_global_token_mean():
    """Two processes' losses, each divided by the global batch's labelled tokens and multiplied by the world
    (DDP then averages), give the gradient of one process on the global batch."""
    from loratag.train.session import token_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 6, 7)
    gold = torch.randint(0, 7, (4, 6))
    gold[0, :3] = -100
    whole, _ = token_loss(logits, gold, int((gold != -100).sum()))
    halves = [token_loss(logits[i : i + 2], gold[i : i + 2], int((gold != -100).sum()), world=2)[0] for i in (0, 2)]
    torch.testing.assert_close(sum(halves) / 2, whole)
    torch.testing.assert_close(whole, torch.nn.functional.cross_entropy(logits.flatten(0, 1), gold.flatten()))


@pytest.mark.parametrize("base", ["tiny_bert", "tiny_roberta"])
def test_all_linear_adapts_every_encoder_linear_layer_not_the_head(base, request, tiny_cfg, tmp_path):
    """`--target-modules all-linear` (the example in --help) used to die in PEFT: its all-linear takes in the
    classifier, which TOKEN_CLS also trains whole (modules_to_save)."""
    from peft.tuners.lora import LoraLayer

    from loratag.labels import LabelSet
    from loratag.modeling import build_model

    cfg = replace(
        tiny_cfg, model=str(request.getfixturevalue(base)), lora=replace(tiny_cfg.lora, target_modules="all-linear")
    )
    model = build_model(cfg, LabelSet.load(RESOURCES / "tiny/label.json"))
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    linear = {
        n.replace(".base_layer", "")
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".encoder." in n and "lora_" not in n
    }
    assert linear and linear <= adapted  # every Linear of the encoder: q, k, v, attention output, FFN in and out
    assert len(adapted) == 6 * 2  # 6 Linear layers per layer x 2 layers
    assert not any("classifier" in n for n in adapted)
    assert "classifier" in str(model.peft_config["default"].modules_to_save)
    run, tagger = train_and_load(replace(cfg, train=replace(cfg.train, epochs=1)), tmp_path / "r", progress=False)
    assert len(tagger.tag_words(WORDS)) == 2
    saved = json.loads((run / "adapter/adapter_config.json").read_text())["target_modules"]
    assert set(saved) == {"query", "key", "value", "dense"}


def test_saving_an_adapter_makes_no_network_call(tiny_cfg, tmp_path, monkeypatch):
    """PEFT's save asks the Hub whether the base's vocabulary grew unless told; loratag tells it (no network in the
    training loop: a firewalled machine would wait out a timeout at every save)."""
    import peft.utils.save_and_load as sl

    def no_network(*a, **kw):
        raise AssertionError("a Hub lookup while saving the adapter")

    monkeypatch.setattr(sl, "check_file_exists_on_hf_hub", no_network)
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, epochs=1))
    run = train(cfg, tmp_path / "run", progress=False)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_without_epochs_a_small_corpus_trains_at_least_min_steps(tiny_cfg, tmp_path, caplog):
    """No --epochs: 4 epochs, or more where 4 are fewer than --min-steps steps; a given --epochs is exact."""
    with caplog.at_level("INFO", logger="loratag"):
        run = train(replace(tiny_cfg, train=replace(tiny_cfg.train, epochs=None, min_steps=9)), tmp_path / "a")
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["steps"] for e in metrics["epochs"]] == [2] * 5  # 8 sentences in batches of 4: ceil(9 / 2) epochs
    assert "5 epochs: 2 steps per epoch, and --min-steps 9" in caplog.text
    assert "5 epochs" in (run / "README.md").read_text()
    run = train(replace(tiny_cfg, train=replace(tiny_cfg.train, epochs=None, min_steps=0)), tmp_path / "b")
    assert len(json.loads((run / "metrics.json").read_text())["epochs"]) == 4
    run = train(replace(tiny_cfg, train=replace(tiny_cfg.train, epochs=1, min_steps=100)), tmp_path / "c")
    assert len(json.loads((run / "metrics.json").read_text())["epochs"]) == 1
