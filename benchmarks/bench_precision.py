"""What bf16 costs in F1: training with bf16 autocast against fp32 (same seed, same data, same settings), and
evaluation of each trained adapter in bf16 against fp32 (merged, as `loratag predict` and `evaluate` run it).
Prints one JSON line with the F1 matrix and the deltas (validation and test), the CPU flags and the matmul peak.

    python benchmarks/bench_precision.py --data ../shared/data/bionlp2004 --train-sentences 5000 --epochs 2

Each training arm runs alone in a fresh process. Where the CPU emulates bf16 (AVX2 only: ~1 GFLOP/s), the bf16
arm is ~100x slower: run this on a CPU with AVX-512-BF16 or AMX, or on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit, matmul_peak, run_arm  # noqa: E402


def train_arm(a) -> dict:
    from loratag.config import Config, LoraSettings, TrainConfig
    from loratag.data import load_corpus
    from loratag.evaluation import evaluate
    from loratag.tagger import Tagger
    from loratag.train import train

    cfg = Config(
        model=a.model,
        data=a.data,
        lora=LoraSettings(bias=a.bias),
        train=TrainConfig(
            epochs=a.epochs,
            lr=a.lr,
            warmup_ratio=a.warmup_ratio,
            max_train_sentences=a.train_sentences,
            precision=a.arm,
            checkpoint_minutes=0,
        ),
    )
    run = train(cfg, Path(a.out) / a.arm, overwrite=True, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    corpus = load_corpus(a.data)
    result = {"train_precision": a.arm, "train_seconds": sum(e["train_seconds"] for e in metrics["epochs"])}
    for eval_precision in ("fp32", "bf16"):
        tagger = Tagger.load(run, precision=eval_precision)
        for split in ("validation", "test"):
            s = evaluate(tagger, corpus.splits[split])
            result[f"{split}_f1_eval_{eval_precision}"] = round(s["f1"], 4)
            per_type = {k: round(v["f1"], 4) for k, v in s["per_type"].items()}
            result[f"{split}_per_type_eval_{eval_precision}"] = per_type
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    p.add_argument("--data", default="../shared/data/bionlp2004")
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-sentences", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--bias", default="all")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--out", default=None, help="where the two runs go [default: a temporary folder]")
    a = p.parse_args()
    if a.arm:
        emit(train_arm(a))
        return
    out = a.out or tempfile.mkdtemp(prefix="bench-precision-")
    args = [
        *("--data", a.data, "--model", a.model, "--train-sentences", str(a.train_sentences)),
        *("--epochs", str(a.epochs), "--bias", a.bias, "--lr", str(a.lr), "--warmup-ratio", str(a.warmup_ratio)),
        *("--out", out),
    ]
    arms = {arm: run_arm(__file__, arm, args) for arm in ("fp32", "bf16")}
    deltas = {}
    for split in ("validation", "test"):
        f = {(t, e): arms[t][f"{split}_f1_eval_{e}"] for t in ("fp32", "bf16") for e in ("fp32", "bf16")}
        deltas[split] = {
            "train_bf16_minus_fp32 (eval fp32)": round(f["bf16", "fp32"] - f["fp32", "fp32"], 4),
            "train_bf16_minus_fp32 (eval bf16)": round(f["bf16", "bf16"] - f["fp32", "bf16"], 4),
            "eval_bf16_minus_fp32 (fp32-trained)": round(f["fp32", "bf16"] - f["fp32", "fp32"], 4),
            "eval_bf16_minus_fp32 (bf16-trained)": round(f["bf16", "bf16"] - f["bf16", "fp32"], 4),
            "all_bf16_minus_all_fp32": round(f["bf16", "bf16"] - f["fp32", "fp32"], 4),
        }
    emit(
        {
            "bench": "precision",
            "cpu": cpu_facts(),
            "matmul_gflops": matmul_peak(),
            "settings": vars(a),
            "arms": arms,
            "f1_deltas": deltas,
            "train_speedup_bf16": round(arms["fp32"]["train_seconds"] / arms["bf16"]["train_seconds"], 2),
        }
    )


if __name__ == "__main__":
    main()
