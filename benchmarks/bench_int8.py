"""int8 against fp32 and bf16 on the command users run: one adapter tags the BioNLP2004 test set (3,856 sentences,
gold words) through loratag's Tagger (the path of predict, evaluate and serve) at each precision; prints one JSON
line with, per arm, sentences per second, test F1 (typed and untyped, seqeval default mode), the matmul peak measured
for that arm's dtype at MiniLM's feed-forward shape, and the fraction of it the arm achieved; then int8's speed-up
and F1 change against fp32, and the CPU flags.

    python benchmarks/bench_int8.py RUN [--data ../shared/data/bionlp2004] [--arms fp32,bf16,int8,int8_torch_ao]

Arms: fp32 and bf16 (torch; bf16 only where the CPU runs it natively), int8 (ONNX Runtime, what --quantize int8
runs), int8_keep_ffn2_0 (the same with layer 0's feed-forward output matmul left fp32), int8_torch_ao (torch.ao's
quantize_dynamic, per-tensor, every Linear: what --quantize int8 ran before, for reference). Each arm runs alone in
a fresh process; loading is timed apart, tagging is timed after a warm-up on the first 200 sentences, best of two
passes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit, run_arm, torch_ao_int8  # noqa: E402

SHAPE = (640, 384, 1536)  # tokens x hidden x FFN: MiniLM's feed-forward matmul at a batch's size


def _timed(fn, repeat: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def peak(dtype: str) -> float:
    """GFLOP/s (GOP/s for int8) of one (m x k) @ (k x n) matmul on this machine now: torch for fp32 and bf16, ONNX
    Runtime's dynamically quantized MatMul (the int8 arm's kernel, activations quantized on the fly) for int8."""
    import torch

    m, k, n = SHAPE
    flops = 2 * m * k * n
    if dtype in ("fp32", "bf16"):
        dt = torch.float32 if dtype == "fp32" else torch.bfloat16
        a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        return round(flops / _timed(lambda: a @ b, 20) / 1e9, 1)
    import tempfile

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from loratag.onnxrt import Int8Scheme, _session, quantize_int8

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [m, n])],
        [helper.make_tensor("w", TensorProto.FLOAT, [k, n], w.flatten())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, src)
        quantize_int8(src, dst, Int8Scheme())
        session = _session(dst)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    return round(flops / _timed(lambda: session.run(["logits"], {"x": x}), 20) / 1e9, 1)


def flop_per_token(config, tokens_per_sentence: float) -> float:
    """Multiply-adds x 2 of one sub-word through the encoder and the classifier: the Linear layers, plus QK^T and
    AV over a sentence's length."""
    h, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    linear = layers * (4 * h * h + 2 * h * ffn) + h * config.num_labels
    return 2 * linear + layers * 4 * h * tokens_per_sentence


def arm(a, how: str) -> dict:

    from loratag.config import CorpusSettings
    from loratag.corpus import load
    from loratag.evaluation import scores
    from loratag.tagger import Tagger

    test = load(a.data, CorpusSettings(), 42, only="test").splits["test"]
    words = [s.tokens for s in test]
    t = time.perf_counter()
    if how == "int8":
        tagger = Tagger.load(a.run, quantize="int8")
    else:
        tagger = Tagger.load(a.run, precision="fp32" if how.startswith("int8") else how)
    if how == "int8_torch_ao":
        tagger.model = torch_ao_int8(tagger.model, per_channel=False)
    elif how == "int8_keep_ffn2_0":  # the default scheme but for layer 0's FFN output matmul: fp32
        from loratag.onnxrt import Int8Scheme, int8_model

        scheme = Int8Scheme(keep_float=("layer.0/output/dense/MatMul",))
        tagger.model = int8_model(tagger.model, tagger.tokenizer.pad_token_id or 0, scheme)
    config = tagger.model.config
    load_s = time.perf_counter() - t
    tagger.tag_words(words[:200])
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        predicted = [labels for labels, _ in tagger.tag_words(words)]
        best = min(best, time.perf_counter() - t)
    result = scores([s.tags for s in test], predicted)
    sub = sum(len(tagger.tokenizer(list(w), is_split_into_words=True)["input_ids"]) for w in words)
    gflop = flop_per_token(config, sub / len(words)) * sub / 1e9
    dtype = "int8" if how.startswith("int8") else how
    top = peak(dtype)
    return {
        "sentences_per_s": round(len(words) / best, 1),
        "seconds": round(best, 2),
        "load_s": round(load_s, 1),
        "f1": round(result["f1"], 4),
        "untyped_f1": round(result["untyped"]["f1"], 4),
        "subwords_per_sentence": round(sub / len(words), 1),
        "achieved_gflops": round(gflop / best, 1),
        f"peak_{dtype}_gflops": top,
        "fraction_of_peak": round(gflop / best / top, 3),
        "quantized": tagger.quantized,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a loratag run directory")
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--arms", default="fp32,bf16,int8,int8_torch_ao", help="also: int8_keep_ffn2_0")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        import transformers

        transformers.logging.set_verbosity_error()
        emit(arm(a, a.arm))
        return
    from loratag.precision import cpu_bf16

    arms = [x for x in a.arms.split(",") if x != "bf16" or cpu_bf16() != "emulated"]
    results = {name: run_arm(__file__, name, [a.run, "--data", a.data]) for name in arms}
    out = {"run": a.run, **results}
    if "fp32" in results:
        for name in arms:
            if name != "fp32":
                out[f"{name}_speedup_vs_fp32"] = round(
                    results[name]["sentences_per_s"] / results["fp32"]["sentences_per_s"], 2
                )
                out[f"{name}_f1_delta_points"] = round(100 * (results[name]["f1"] - results["fp32"]["f1"]), 2)
    out["cpu"] = cpu_facts()
    emit(out)


if __name__ == "__main__":
    main()
