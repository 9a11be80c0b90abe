"""Precision: what `auto` picks on each kind of machine, and the bf16 path against fp32 with stated tolerances.

The bf16 tests ask for bf16 explicitly, so they run on every machine (tiny models are fast even where bf16 is
emulated). Exact comparisons elsewhere run in fp32 (conftest pins `auto` to fp32 by patching the detection)."""

import json
from dataclasses import replace

import pytest
import torch

from loratag import precision
from loratag.precision import cpu_bf16, resolve_precision
from loratag.precision import cpu_features as real_cpu_features
from loratag.tagger import Tagger
from loratag.train import train_and_load

from .conftest import AMX, AVX2, ZEN4, guide_lora, guide_train

WORDS = [["IL-2", "gene", "expression", "requires", "NF-kappa", "B", "."], ["T", "cells", "express", "CD28", "."]]

# bf16 keeps 8 significant bits: each rounding of a matmul input is off by up to 2^-9 (0.2%) of its value, and
# the tiny 2-layer model's logits (|x| up to ~2.1 here) go through ~8 such matmuls. Measured on these fixtures
# (Zen 4, 2026-12-01): bf16 vs fp32 inference 0.0051 at most; bf16- vs fp32-trained weights, 0.0027. The
# tolerance allows ~10x that, 0.05 absolute: bf16 drift, not a wrong adapter, head or label order (those change
# logits by whole units).
BF16_ATOL = 0.05


@pytest.mark.parametrize(
    "features, kind, expected",
    [(AVX2, "emulated", None), (ZEN4, "avx512_bf16", torch.bfloat16), (AMX, "amx", torch.bfloat16)],
    ids=["avx2", "avx512_bf16", "amx"],
)
def test_auto_precision_per_cpu_kind(monkeypatch, features, kind, expected):
    monkeypatch.setattr(precision, "cpu_features", lambda: features)
    assert cpu_bf16() == kind
    assert resolve_precision("auto", torch.device("cpu")) == expected
    # an explicit choice is kept whatever the machine
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_auto_precision_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16


def test_detection_reads_the_flags_not_only_torch(monkeypatch):
    """Zen 4 reports torch capability AVX512 (not AVX512_BF16): the cpuinfo flag must decide."""
    monkeypatch.setattr(precision, "cpu_features", lambda: (frozenset({"avx512f", "avx512_bf16"}), "AVX512"))
    assert cpu_bf16() == "avx512_bf16"
    monkeypatch.setattr(precision, "cpu_features", lambda: (frozenset({"avx512f"}), "AVX512"))
    assert cpu_bf16() == "emulated"


def test_real_detection_runs_here():
    """The unpatched reader (imported before conftest patches the module attribute) on this machine."""
    flags, capability = real_cpu_features()
    assert isinstance(flags, frozenset) and isinstance(capability, str) and capability
    if any(f.startswith(("avx", "sse")) for f in flags):  # an x86 machine with /proc/cpuinfo
        assert "sse2" in flags


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, tiny_bert):
    """The same tiny run trained in fp32 and with bf16 autocast (same seed)."""
    from loratag.config import Config

    from .conftest import RESOURCES

    base = Config(
        model=str(tiny_bert),
        data=str(RESOURCES / "tiny"),
        lora=guide_lora(r=4, alpha=8, bias="all"),
        train=guide_train(lr=0.05, batch_size=4, epochs=2, checkpoint_minutes=0, precision="fp32"),
    )
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for p in ("fp32", "bf16"):
        cfg = replace(base, train=replace(base.train, precision=p))
        out[p] = train_and_load(cfg, root / p, progress=False)
    return out


def test_metrics_record_the_precision_of_validation_and_test(bf16_runs):
    for p, (run, _) in bf16_runs.items():
        m = json.loads((run / "metrics.json").read_text())
        assert [e["validation"]["autocast"] for e in m["epochs"]] == [p, p]
        assert m["test"]["autocast"] == p
        assert json.loads((run / "config.json").read_text())["run"]["autocast"] == p


def test_bf16_run_reloads_exactly_in_bf16(bf16_runs):
    """Reloaded unmerged in bf16, the bf16-trained adapter computes what training's in-memory Tagger computes:
    the same weights through the same operations (exact, as fp32 is)."""
    run, mem = bf16_runs["bf16"]
    assert mem.precision == "bf16"
    loaded = Tagger.load(run, merge=False, precision="bf16")
    for a, e in zip(loaded.word_logits(WORDS), mem.word_logits(WORDS)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("trained", ["fp32", "bf16"])
def test_bf16_inference_within_tolerance_of_fp32(bf16_runs, trained):
    """Merged bf16 inference (what predict and serve run on a bf16 machine) against fp32, same adapter."""
    run, _ = bf16_runs[trained]
    fp32 = Tagger.load(run, precision="fp32").word_logits(WORDS)
    bf16 = Tagger.load(run, precision="bf16").word_logits(WORDS)
    for a, b in zip(bf16, fp32):
        torch.testing.assert_close(a, b, rtol=0, atol=BF16_ATOL)
        # labels agree wherever fp32's top two logits are not a near-tie (within twice the tolerance)
        top2 = b.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_ATOL
        assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


def test_bf16_training_stays_near_fp32_training(bf16_runs):
    """Training with bf16 autocast moves the trained weights a little (bf16 forward and backward), not wholesale:
    both runs' logits on the same words agree to a loose bound, and the LoRA weights stay fp32."""
    (_, t32), (run16, t16) = bf16_runs["fp32"], bf16_runs["bf16"]
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(run16 / "adapter/adapter_model.safetensors").values()} == {torch.float32}
    t32p = Tagger(t32.model, t32.tokenizer, t32.labels, precision="fp32")
    t16p = Tagger(t16.model, t16.tokenizer, t16.labels, precision="fp32")
    for a, b in zip(t16p.word_logits(WORDS), t32p.word_logits(WORDS)):
        # the runs drift apart by bf16 rounding in every step's forward and backward (0.0027 measured)
        torch.testing.assert_close(a, b, rtol=0, atol=BF16_ATOL)
