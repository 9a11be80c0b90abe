"""The training study: which settings give the best model per CPU-minute on the full BioNLP2004.

Every arm trains on train, keeps the best epoch by validation F1 and scores test once, in a fresh process, alone
(two PyTorch processes on two cores slow each other ~10x). Arms change one thing at a time from the guide's recipe,
then combine what helped. Each arm's result is appended to a JSON Lines file as soon as it ends, and arms already
there are skipped, so the study survives a session's end; run it in the background:

    nohup python benchmarks/bench_quality.py --arms parity-guide-s42,parity-loratag-s42 &
    python benchmarks/bench_quality.py --list                 # the arms and what each changes
    python benchmarks/bench_quality.py --table                # the table so far (markdown)

Recorded per arm: wall minutes of the whole training process (evaluations included), training tokens/s, validation
F1 per epoch (argmax and constrained decoding), the kept epoch, test P/R/F1 with both decodings, per-type test F1,
the CPU's flags and the matmul peak measured when the arm ran. Test F1 is reported, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, matmul_peak, run_arm  # noqa: E402

DATA = os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004")

# the guide's recipe in loratag's flags (the parity arm); every other arm starts from a named arm and changes flags
GUIDE = {
    "--bias": "all",
    "--target-modules": "none",  # PEFT's default for the architecture: query, value
    "--lora-top-layers": "none",
    "--rslora": "false",
    "--lora-plus-ratio": "1",
    "--lora-r": "16",
    "--lora-alpha": "16",
    "--lora-dropout": "0.1",
    "--lr": "1e-3",
    "--batch-size": "16",
    "--weight-decay": "0.01",
    "--warmup-ratio": "0",
    "--precision": "fp32",
    "--length-grouping": "false",
    "--low-precision-weights": "false",
    "--decode": "argmax",
    "--epochs": "1",
}
FAST = {"--precision": "bf16", "--length-grouping": "true", "--low-precision-weights": "true"}
TUNED = {"--target-modules": "query,key,value,dense", "--lr": "2e-3", "--warmup-ratio": "0.06"}

# name -> (what it changes, based on, flags); "guide" arms run the guide's own code (benchmarks/bench_train.py)
ARMS: dict[str, tuple[str, str | None, dict]] = {
    "parity-guide-s42": ("the guide's code (Trainer + PEFT), 1 epoch, seed 42", "guide", {"seed": 42}),
    "parity-guide-s43": ("the guide's code, 1 epoch, seed 43", "guide", {"seed": 43}),
    "full-ft-2ep": (
        "the ceiling: full fine-tuning of MiniLM (Trainer, no LoRA), lr 1e-4, warmup 6%, bf16 where native, "
        "length grouping, 2 epochs",
        "guide",
        {"seed": 42, "arm": "full", "epochs": 2, "full_lr": 1e-4},
    ),
    "parity-loratag-s42": ("loratag with the guide's settings, 1 epoch, seed 42", None, {"--seed": "42"}),
    "parity-loratag-s43": ("loratag with the guide's settings, 1 epoch, seed 43", None, {"--seed": "43"}),
    "fast-1ep": ("parity + bf16 + length grouping + bf16-resident weights", "parity-loratag-s42", FAST),
    "fast-fp32-1ep": ("fast-1ep in fp32 (bf16 off)", "fast-1ep", {"--precision": "fp32"}),
    "fast-resident-off-1ep": (
        "fast-1ep, frozen weights cast at every step",
        "fast-1ep",
        {"--low-precision-weights": "false"},
    ),
    "bias-none-1ep": ("fast-1ep with bias none", "fast-1ep", {"--bias": "none"}),
    "bias-lora-only-1ep": ("fast-1ep with bias lora_only", "fast-1ep", {"--bias": "lora_only"}),
    "all-linear-1ep": (
        "fast-1ep with LoRA on every Linear",
        "fast-1ep",
        {"--target-modules": "query,key,value,dense"},
    ),
    "tuned-3ep": ("all-linear, lr 2e-3, warmup 6%, 3 epochs decaying to 0", "fast-1ep", {**TUNED, "--epochs": "3"}),
    "tuned-top4-3ep": ("tuned-3ep, LoRA on the top 4 layers, 2 cached", "tuned-3ep", {"--lora-top-layers": "4"}),
    "tuned-top3-3ep": ("tuned-3ep, LoRA on the top 3 layers, 3 cached", "tuned-3ep", {"--lora-top-layers": "3"}),
    "tuned-top2-3ep": ("tuned-3ep, LoRA on the top 2 layers, 4 cached", "tuned-3ep", {"--lora-top-layers": "2"}),
    "tuned-top3-5ep": ("tuned-top3 for 5 epochs", "tuned-top3-3ep", {"--epochs": "5"}),
    "tuned-top4-4ep": ("tuned-top4 for 4 epochs", "tuned-top4-3ep", {"--epochs": "4"}),
    "defaults": ("loratag train with its defaults (no flags)", "defaults", {}),
    "defaults-budget-12.28": (
        "the defaults with --time-budget 12.28 (1/10 of the guide's 10 epochs)",
        "defaults",
        {"--time-budget": "12.28"},
    ),
    "defaults-budget-15": ("the defaults with --time-budget 15", "defaults", {"--time-budget": "15"}),
    "defaults-budget-5": ("the defaults with --time-budget 5", "defaults", {"--time-budget": "5"}),
    "defaults-budget-20.03": (
        "the defaults with --time-budget 20.03 (1/10 of the guide's 10 epochs on AVX2 at 567.7 tok/s)",
        "defaults",
        {"--time-budget": "20.03"},
    ),
    "defaults-budget-8.69": (
        "the defaults with --time-budget 8.69 (1/10 of the guide's 10 epochs on AMX at 1,309 tok/s)",
        "defaults",
        {"--time-budget": "8.69"},
    ),
    "defaults-bias-none": ("the defaults with bias none (a shared base)", "defaults", {"--bias": "none"}),
    "defaults-bias-lora-only": ("the defaults with bias lora_only", "defaults", {"--bias": "lora_only"}),
    "defaults-top3-4ep": (
        "the defaults with LoRA on the top 3 layers (3 cached), 4 epochs",
        "defaults",
        {"--lora-top-layers": "3", "--epochs": "4"},
    ),
    "tuned-nodrop-2ep": (
        "all-linear on every layer, LoRA dropout 0, 2 epochs",
        "tuned-3ep",
        {"--lora-dropout": "0", "--epochs": "2"},
    ),
    "tuned-top3-nodrop-5ep": ("tuned-top3-5ep, LoRA dropout 0", "tuned-top3-5ep", {"--lora-dropout": "0"}),
    "tuned-top4-nodrop-4ep": ("tuned-top4-4ep, LoRA dropout 0", "tuned-top4-4ep", {"--lora-dropout": "0"}),
    "tuned-top3-nodrop-lr3e-3-5ep": ("tuned-top3-nodrop-5ep, lr 3e-3", "tuned-top3-nodrop-5ep", {"--lr": "3e-3"}),
    "tuned-top4-5ep": ("tuned-top4 for 5 epochs", "tuned-top4-3ep", {"--epochs": "5"}),
    "tuned-top3-lr3e-3-5ep": ("tuned-top3-5ep with lr 3e-3", "tuned-top3-5ep", {"--lr": "3e-3"}),
    "tuned-top3-lr1e-3-5ep": ("tuned-top3-5ep with lr 1e-3", "tuned-top3-5ep", {"--lr": "1e-3"}),
    "tuned-top3-r32-5ep": (
        "tuned-top3-5ep with r 32, alpha 32",
        "tuned-top3-5ep",
        {"--lora-r": "32", "--lora-alpha": "32"},
    ),
    "tuned-top3-rslora-5ep": ("tuned-top3-5ep with rsLoRA", "tuned-top3-5ep", {"--rslora": "true"}),
    "tuned-top3-loraplus-5ep": ("tuned-top3-5ep with LoRA+ (B lr x4)", "tuned-top3-5ep", {"--lora-plus-ratio": "4"}),
    "tuned-top3-random-5ep": ("tuned-top3-5ep, random batches", "tuned-top3-5ep", {"--length-grouping": "false"}),
    # one change at a time from the defaults (all-linear LoRA r 16, dropout 0, bias all, lr 2e-3, warmup 6%, 2 epochs)
    "defaults-lr1e-3": ("the defaults with lr 1e-3", "defaults", {"--lr": "1e-3"}),
    "defaults-lr3e-3": ("the defaults with lr 3e-3", "defaults", {"--lr": "3e-3"}),
    "defaults-lr5e-4": ("the defaults with lr 5e-4", "defaults", {"--lr": "5e-4"}),
    "defaults-r32": ("the defaults with r 32, alpha 32", "defaults", {"--lora-r": "32", "--lora-alpha": "32"}),
    "defaults-r8": ("the defaults with r 8, alpha 8", "defaults", {"--lora-r": "8", "--lora-alpha": "8"}),
    "defaults-rslora": (
        "the defaults with rsLoRA (scale alpha/sqrt(r): 4x at r 16)",
        "defaults",
        {"--rslora": "true"},
    ),
    "defaults-loraplus4": ("the defaults with LoRA+ (B's lr x4)", "defaults", {"--lora-plus-ratio": "4"}),
    "defaults-random": (
        "the defaults with random batches (length grouping off)",
        "defaults",
        {"--length-grouping": "false"},
    ),
    "defaults-top4-budget-12.51": (
        "the defaults with LoRA on the top 4 layers (2 cached), in the defaults' time on Zen 4 (12.51 min)",
        "defaults",
        {"--lora-top-layers": "4", "--time-budget": "12.51"},
    ),
    "defaults-top2-budget-12.51": (
        "the defaults with LoRA on the top 2 layers (4 cached), in the defaults' time on Zen 4 (12.51 min)",
        "defaults",
        {"--lora-top-layers": "2", "--time-budget": "12.51"},
    ),
    # issue 25: the time the issue allows is a fifth of the guide's 10 epochs (parity-guide-s42 trained 12.28 min
    # per epoch on Zen 4: 122.8 min for 10, a fifth 24.56 min)
    "defaults-budget-24.56": (
        "the defaults with --time-budget 24.56 (1/5 of the guide's 10 epochs on Zen 4)",
        "defaults",
        {"--time-budget": "24.56"},
    ),
    "defaults-context32-budget-24.56": (
        "defaults-budget-24.56 with 32 sub-tokens of document context each side (FLERT)",
        "defaults",
        {"--time-budget": "24.56", "--context": "32"},
    ),
    "defaults-context64-budget-24.56": (
        "defaults-budget-24.56 with 64 sub-tokens of document context each side (FLERT)",
        "defaults",
        {"--time-budget": "24.56", "--context": "64"},
    ),
    "defaults-4ep": (
        "the defaults for 4 epochs (what defaults-budget-24.56 kept: its 4th epoch)",
        "defaults",
        {"--epochs": "4"},
    ),
    # slices (the first N training sentences: whole abstracts) and a single-type subset, one change at a time
    "slice5k-guide-2ep": (
        "the guide's code, 2 epochs, on the first 5,000 training sentences",
        "guide",
        {"seed": 42, "epochs": 2, "train_sentences": 5000},
    ),
    "slice5k-defaults-fifth": (
        "the defaults on the first 5,000 sentences, --time-budget a fifth of slice5k-guide-2ep's training time",
        "defaults",
        {"--max-train-sentences": "5000", "--time-budget": "fifth-of:slice5k-guide-2ep"},
    ),
    "slice2k-defaults": ("the defaults on the first 2,000 sentences", "defaults", {"--max-train-sentences": "2000"}),
    "slice2k-context32": ("slice2k-defaults with --context 32", "slice2k-defaults", {"--context": "32"}),
    "slice2k-6ep": ("slice2k-defaults for 6 epochs", "slice2k-defaults", {"--epochs": "6"}),
    "slice5k-defaults": ("the defaults on the first 5,000 sentences", "defaults", {"--max-train-sentences": "5000"}),
    "slice5k-context32": ("slice5k-defaults with --context 32", "slice5k-defaults", {"--context": "32"}),
    "slice5k-4ep": ("slice5k-defaults for 4 epochs", "slice5k-defaults", {"--epochs": "4"}),
    "slice5k-defaults-s43": ("slice5k-defaults, seed 43 (for averaging)", "slice5k-defaults", {"--seed": "43"}),
    "slice5k-defaults-s44": ("slice5k-defaults, seed 44 (for averaging)", "slice5k-defaults", {"--seed": "44"}),
    "dna-defaults": ("the defaults on DNA alone (--types DNA: 3 labels)", "defaults", {"--types": "DNA"}),
    "dna-context32": ("dna-defaults with --context 32", "dna-defaults", {"--context": "32"}),
    "dna5k-defaults": (
        "the defaults on DNA alone (--types DNA: 3 labels), first 5,000 sentences",
        "defaults",
        {"--types": "DNA", "--max-train-sentences": "5000"},
    ),
    "dna5k-context32": ("dna5k-defaults with --context 32", "dna5k-defaults", {"--context": "32"}),
    "dna5k-4ep": ("dna5k-defaults for 4 epochs (the defaults now)", "dna5k-defaults", {"--epochs": "4"}),
    "slice5k-case": (
        "slice5k-4ep with --case, the token-type table trained whole (rows 0 and 1)",
        "slice5k-4ep",
        {"--case": "true"},
    ),
    "slice2k-case": ("slice2k-6ep with --case", "slice2k-6ep", {"--case": "true"}),
    "dna5k-case": ("dna5k-4ep with --case", "dna5k-4ep", {"--case": "true"}),
    "defaults-4ep-case": (
        "defaults-4ep with --case, the token-type table trained whole (rows 0 and 1)",
        "defaults-4ep",
        {"--case": "true"},
    ),
    "slice5k-fifth-again": (
        "slice5k-defaults-fifth, evaluation scoring entities once, --case with the table trained whole",
        "slice5k-defaults-fifth",
        {},
    ),
    "slice5k-fifth-2x": (
        "slice5k-fifth-again with twice the budget (F1 against steps)",
        "slice5k-defaults",
        {"--time-budget": "share-of:slice5k-guide-2ep:0.4"},
    ),
    "slice5k-fifth-4x": (
        "slice5k-fifth-again with four times the budget (F1 against steps)",
        "slice5k-defaults",
        {"--time-budget": "share-of:slice5k-guide-2ep:0.8"},
    ),
    "slice5k-case-row1": (
        "slice5k-4ep with --case, row 1 of the token-type table trained, row 0 kept (the defaults now)",
        "slice5k-4ep",
        {"--case": "true"},
    ),
    "slice2k-case-row1": (
        "slice2k-6ep with --case (row 1 trained: the defaults now)",
        "slice2k-6ep",
        {"--case": "true"},
    ),
    "dna5k-case-row1": ("dna5k-4ep with --case (row 1 trained: the defaults now)", "dna5k-4ep", {"--case": "true"}),
    "defaults-now": (
        "loratag train with its defaults: 4 epochs, --case auto (on for MiniLM; row 1 trained)",
        "defaults",
        {},
    ),
    "defaults-5ep": (
        "defaults-now for 5 epochs (the time the fifth leaves: 18.87 of 24.56 minutes)",
        "defaults-now",
        {"--epochs": "5"},
    ),
    "defaults-crf": (
        "defaults-now with --crf (a CRF over the words' logits, its own learning rate 1e-2)",
        "defaults-now",
        {"--crf": "true"},
    ),
    "defaults-crf-joint": (
        "defaults-crf with --crf-token-loss 1 (the words' cross-entropy beside the CRF's loss: argmax stays usable)",
        "defaults-crf",
        {"--crf-token-loss": "1"},
    ),
    "slice5k-crf": (
        "slice5k-case-row1 (the defaults now on 5,000 sentences) with --crf",
        "slice5k-case-row1",
        {"--crf": "true"},
    ),
    "dna5k-crf": ("dna5k-case-row1 (the defaults now on DNA alone) with --crf", "dna5k-case-row1", {"--crf": "true"}),
    "slice2k-crf": (
        "slice2k-case-row1 (the defaults now on 2,000 sentences) with --crf",
        "slice2k-case-row1",
        {"--crf": "true"},
    ),
    "slice5k-fifth-s43": ("slice5k-fifth-row1, seed 43 (its spread)", "slice5k-fifth-row1", {"--seed": "43"}),
    "slice5k-fifth-s44": ("slice5k-fifth-row1, seed 44 (its spread)", "slice5k-fifth-row1", {"--seed": "44"}),
    "slice5k-fifth-head": (
        "slice5k-fifth-row1 with --head-init labels (the head starts as the base features' discriminant)",
        "slice5k-fifth-row1",
        {"--head-init": "labels"},
    ),
    "slice5k-fifth-head-s43": ("slice5k-fifth-head, seed 43", "slice5k-fifth-head", {"--seed": "43"}),
    "slice5k-fifth-head-s44": ("slice5k-fifth-head, seed 44", "slice5k-fifth-head", {"--seed": "44"}),
    "slice5k-head": (
        "slice5k-case-row1 (the defaults now on 5,000 sentences) with --head-init labels",
        "slice5k-case-row1",
        {"--head-init": "labels"},
    ),
    "slice5k-fifth-crf": (
        "slice5k-fifth-row1 with --crf (the defaults after it: auto, on)",
        "slice5k-fifth-row1",
        {"--crf": "true"},
    ),
    "slice5k-fifth-crf-s43": ("slice5k-fifth-crf, seed 43", "slice5k-fifth-crf", {"--seed": "43"}),
    "slice5k-fifth-crf-s44": ("slice5k-fifth-crf, seed 44", "slice5k-fifth-crf", {"--seed": "44"}),
    "defaults-final": (
        "loratag train with its defaults: 4 epochs, --case auto and --crf auto (both on)",
        "defaults",
        {},
    ),
    "slice5k-fifth-row1": (
        "the defaults now on the first 5,000 sentences, --time-budget a fifth of slice5k-guide-2ep's training time",
        "defaults",
        {"--max-train-sentences": "5000", "--time-budget": "fifth-of:slice5k-guide-2ep"},
    ),
    "slice5k-fifth-row1-2x": (
        "slice5k-fifth-row1 with twice the budget (F1 against steps)",
        "defaults",
        {"--max-train-sentences": "5000", "--time-budget": "share-of:slice5k-guide-2ep:0.4"},
    ),
    "slice5k-fifth-row1-4x": (
        "slice5k-fifth-row1 with four times the budget (F1 against steps)",
        "defaults",
        {"--max-train-sentences": "5000", "--time-budget": "share-of:slice5k-guide-2ep:0.8"},
    ),
}


def flags_of(name: str) -> dict:
    desc, base, flags = ARMS[name]
    if base == "guide":
        return {}
    if base == "defaults":
        return dict(flags)
    return {**(GUIDE if base is None else flags_of(base)), **flags}


def resolved(flags: dict, results: Path) -> dict:
    """``--time-budget fifth-of:ARM``: a fifth of that (guide) arm's training minutes, as recorded in this run's
    results, so the two are measured on the same machine in one study; ``share-of:ARM:X``: X times them."""
    out = dict(flags)
    spec = out.get("--time-budget", "")
    if spec.startswith(("fifth-of:", "share-of:")):
        kind, ref, *share = spec.split(":")
        share = 0.2 if kind == "fifth-of" else float(share[0])
        rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()] if results.is_file() else []
        mins = [r["train_minutes"] for r in rows if r["arm"] == ref]
        if not mins:
            raise SystemExit(f"--time-budget {spec}: run the arm {ref} first")
        out["--time-budget"] = f"{mins[-1] * share:.2f}"
    return out


def loratag_arm(name: str, runs: Path, results: Path) -> dict:
    """``loratag train`` with the arm's flags, as a user runs it; the record comes from the run directory."""
    out = runs / name
    cmd = [sys.executable, "-m", "loratag", "train", "--data", DATA, "--out", str(out), "--overwrite"]
    for k, v in resolved(flags_of(name), results).items():
        cmd += [k, v]
    cmd += ["--checkpoint-minutes", "0"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return record_of(out, time.perf_counter() - started)


def record_of(out: Path, wall: float | None = None) -> dict:
    """An arm's record from its run directory (``wall``: seconds of the whole process as the parent timed it;
    else the run's own count from its process start, metrics.json ``wall_seconds``)."""
    m = json.loads((out / "metrics.json").read_text())
    wall = m["wall_seconds"] if wall is None else wall
    facts = json.loads((out / "config.json").read_text())["run"]
    epochs = m["epochs"]
    test = m["test"]
    return {
        "wall_minutes": round(wall / 60, 2),
        "train_minutes": round(sum(e["train_seconds"] for e in epochs) / 60, 2),
        "tokens_per_s": round(sum(e["train_tokens"] for e in epochs) / sum(e["train_seconds"] for e in epochs), 1),
        "validation_f1": [round(e["validation"]["f1"], 4) for e in epochs],
        "validation_f1_constrained": [round(e["validation"]["by_decode"]["constrained"]["f1"], 4) for e in epochs],
        "best_epoch": m["best_epoch"],
        "test": {d: {k: round(v[k], 4) for k in ("precision", "recall", "f1")} for d, v in test["by_decode"].items()},
        "test_per_type_f1": {k: round(v["f1"], 4) for k, v in test["per_type"].items()},
        "test_untyped_f1": round(test["untyped"]["f1"], 4) if "untyped" in test else None,  # the run's decoding
        "validation_untyped_f1": [
            round(e["validation"]["untyped"]["f1"], 4) for e in epochs if "untyped" in e["validation"]
        ],
        "trainable_params": facts["trainable_params"],
        "cached_layers": facts["cached_layers"],
        "autocast": facts["autocast"],
        "run": str(out),
        "time_budget": m.get("time_budget"),
    }


def guide_arm(name: str, runs: Path, results: Path) -> dict:
    """The guide's code (benchmarks/bench_train.py), or with ``"arm": "full"`` that code training every weight."""
    spec = ARMS[name][2]
    args = ["--data", DATA, "--epochs", str(spec.get("epochs", 1)), "--seed", str(spec["seed"])]
    if "full_lr" in spec:
        args += ["--full-lr", str(spec["full_lr"])]
    if "train_sentences" in spec:
        args += ["--train-sentences", str(spec["train_sentences"])]
    started = time.perf_counter()
    r = run_arm(str(Path(__file__).parent / "bench_train.py"), spec.get("arm", "guide"), args)
    val = r["validation_f1_by_epoch"]
    return {
        "wall_minutes": round((time.perf_counter() - started) / 60, 2),
        "train_minutes": round(r["train_s"] / 60, 2),
        "tokens_per_s": round(r["tokens_per_s"], 1),
        "validation_f1": [round(f, 4) for f in val],
        "best_epoch": 1 + max(range(len(val)), key=val.__getitem__),  # Trainer's load_best_model_at_end
        "test": {"argmax": {k: round(r[f"test_{k}"], 4) for k in ("precision", "recall", "f1")}},
        "train_tokens_per_epoch": r["train_tokens_per_epoch"],
        "trainable_params": r["trainable_params"],
        "autocast": r["autocast"],
    }


def _commit() -> str:
    """The loratag commit an arm ran (``+`` when the working tree had changes)."""
    root = Path(__file__).parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def done(results: Path) -> set[str]:
    if not results.is_file():
        return set()
    return {json.loads(line)["arm"] for line in results.read_text().splitlines() if line.strip()}


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    out = [
        "| arm | changes | wall min | tok/s | val F1 by epoch | kept | test argmax | test constrained | test untyped "
        "| commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c = r["test"].get("constrained", {}).get("f1")
        out.append(
            f"| {r['arm']} | {r['changes']} | {r['wall_minutes']} | {r['tokens_per_s']:.0f} | "
            f"{' '.join(f'{f:.4f}' for f in r['validation_f1'])} | {r['best_epoch']} | "
            f"{r['test']['argmax']['f1']:.4f} | {'' if c is None else f'{c:.4f}'} | "
            f"{r.get('test_untyped_f1') or ''} | {r.get('commit', '')} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", help="comma-separated arm names, run in this order")
    p.add_argument("--results", type=Path, help="JSON Lines file [default: benchmarks/results/quality-<cpu>.jsonl]")
    p.add_argument("--runs", type=Path, default=Path("/work/study/runs"), help="where the arms' run directories go")
    p.add_argument("--list", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--adopt", metavar="ARM", help="record ARM from its finished run directory (a parent that died)")
    p.add_argument("--again", action="store_true", help="run the arms even if recorded (a new record is appended)")
    a = p.parse_args()
    facts = cpu_facts()
    kind = {"emulated": "avx2"}.get(facts["bf16"], facts["bf16"].replace("_", ""))  # amx, avx512bf16, avx2
    results = a.results or Path(__file__).parent / "results" / f"quality-{kind}.jsonl"
    if a.list:
        for name, (desc, _, _) in ARMS.items():
            print(f"{name:28} {desc}\n{'':28} {' '.join(f'{k} {v}' for k, v in flags_of(name).items())}")
        return
    if a.table:
        print(table(results))
        return
    if a.adopt:
        entry = {
            "arm": a.adopt,
            "changes": ARMS[a.adopt][0],
            "flags": flags_of(a.adopt),
            **record_of(a.runs / a.adopt),
        }
        entry.update(cpu=facts, date=time.strftime("%Y-%m-%d %H:%M"), timed_by="the run (metrics.json wall_seconds)")
        with results.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry))
        return
    for name in (a.arms or "").split(","):
        if not name or (name in done(results) and not a.again):
            continue
        if name not in ARMS:
            raise SystemExit(f"unknown arm {name!r}; see --list")
        peak = matmul_peak()
        record = (guide_arm if ARMS[name][1] == "guide" else loratag_arm)(name, a.runs, results)
        entry = {"arm": name, "changes": ARMS[name][0], "flags": resolved(flags_of(name), results), **record}
        entry.update(cpu=facts, matmul_peak_gflops=peak, date=time.strftime("%Y-%m-%d %H:%M"), commit=_commit())
        with results.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
