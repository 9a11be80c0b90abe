"""Averaging study: K runs of one recipe (seeds) as one averaged adapter (`loratag average`: free at inference)
against their ensemble (the mean of their word probabilities: K forward passes), against each run alone.

    python benchmarks/study_averaging.py --runs R42 R43 R44 --name slice5k-defaults [--results FILE]

Validation F1 is printed for every candidate (the choice between them is by validation); test is scored once per
candidate. Ensemble and runs decode with the runs' own --decode; inference seconds are the word-logit passes over
validation + test. One JSON line per candidate appended to the results file, CPU facts beside them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, matmul_peak  # noqa: E402


def logits_of(tagger, sentences):
    words = [s.tokens for s in sentences]
    started = time.perf_counter()
    out = tagger.word_logits(words, contexts=tagger.contexts(words, [s.doc for s in sentences]))
    return out, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True)
    p.add_argument("--name", required=True, help="what the runs are (recorded)")
    p.add_argument("--soup", type=Path, help="where the averaged run goes [default: beside the first run]")
    p.add_argument("--results", type=Path)
    a = p.parse_args()

    import torch

    from loratag.config import Config
    from loratag.corpus import load
    from loratag.evaluation import scores
    from loratag.tagger import Tagger

    facts = cpu_facts()
    kind = {"emulated": "avx2"}.get(facts["bf16"], facts["bf16"].replace("_", ""))
    results = a.results or Path(__file__).parent / "results" / f"averaging-{kind}.jsonl"
    peak = matmul_peak()
    cfg = Config.load(a.runs[0] / "config.json")
    corpus = load(cfg.data, cfg.corpus, cfg.train.seed)
    splits = {k: corpus.splits[k] for k in ("validation", "test")}
    rows, probs = [], {k: [] for k in splits}
    tagger = None
    for run in a.runs:
        tagger = Tagger.load(run, precision=cfg.train.precision)
        row = {"candidate": f"run {run.name}", "inference_s": 0.0}
        for split, sentences in splits.items():
            logits, seconds = logits_of(tagger, sentences)
            row["inference_s"] += seconds
            probs[split].append([x.softmax(-1) for x in logits])
            predicted = [labels for labels, _ in tagger.decode_logits(logits)]
            s = scores([x.tags for x in sentences], predicted)
            row[split] = {"f1": round(s["f1"], 4), "untyped_f1": round(s["untyped"]["f1"], 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ens = {
        "candidate": f"ensemble of {len(a.runs)} (mean probabilities)",
        "inference_s": sum(r["inference_s"] for r in rows),
    }
    for split, sentences in splits.items():
        mean = [torch.stack(ps).mean(0).clamp_min(1e-9).log() for ps in zip(*probs[split])]
        predicted = [labels for labels, _ in tagger.decode_logits(mean)]
        s = scores([x.tags for x in sentences], predicted)
        ens[split] = {"f1": round(s["f1"], 4), "untyped_f1": round(s["untyped"]["f1"], 4)}
    rows.append(ens)
    print(json.dumps(ens), flush=True)
    soup = a.soup or a.runs[0].parent / f"{a.name}-soup"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loratag", "average", *map(str, a.runs), "--out", str(soup), "--overwrite"],
                   check=True)  # fmt: skip
    m = json.loads((soup / "metrics.json").read_text())
    row = {"candidate": f"average of {len(a.runs)} (loratag average, rank {m['lora_rank']})",
           "average_and_score_s": round(time.perf_counter() - started, 1),
           "inference_s": rows[0]["inference_s"]}  # fmt: skip
    for split in splits:
        row[split] = {"f1": round(m[split]["f1"], 4), "untyped_f1": round(m[split]["untyped"]["f1"], 4)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    stamp = {"name": a.name, "runs": [str(r) for r in a.runs], "decode": cfg.train.decode, "cpu": facts,
             "matmul_peak_gflops": peak, "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    with results.open("a") as f:
        for r in rows:
            f.write(json.dumps({**stamp, **r}) + "\n")


if __name__ == "__main__":
    main()
