"""Issue 22's study: BioNLP2004 trained from its JSON Lines (two seeds: the noise) and from the same corpus written
as BioC XML, PubTator and brat documents (benchmarks/bionlp_documents.py), each arm the same settings and a fixed
amount of work (``--epochs 1``, so that the machine's speed does not change the result), one at a time. Each arm's
result is appended to ``--results`` as it ends (a JSON line: test F1 on words, untyped, and on character spans for
document arms), so a study cut short keeps what it finished; arms already in the file are skipped.

    python benchmarks/bionlp_documents.py --out /tmp/bionlp-docs
    python benchmarks/study_documents.py --docs /tmp/bionlp-docs --runs /tmp/doc-runs \\
        --results benchmarks/results/documents-train.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts  # noqa: E402

SPLITS = {"bioc": "{}.bioc.xml", "pubtator": "{}.pubtator", "brat": "{}"}


def arms(data: Path, docs: Path) -> dict[str, list[str]]:
    out = {f"jsonl-seed{s}": ["--data", str(data), "--seed", str(s)] for s in (42, 43, 44)}
    for s in (42, 43, 44):  # the same sentences, labels in sorted order (as documents give them)
        out[f"jsonl-sorted-labels-seed{s}"] = ["--data", str(docs / "tner-sorted"), "--seed", str(s)]
    for fmt, pattern in SPLITS.items():
        files = [f"--{split}={docs / fmt / pattern.format(split)}" for split in ("train", "validation", "test")]
        for seed in (42, 43, 44) if fmt == "bioc" else (42,):  # BioC's seeds: the documents' own noise
            out[f"{fmt}-seed{seed}"] = [*files, "--seed", str(seed)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/bionlp2004"))
    ap.add_argument("--docs", type=Path, required=True)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--only", nargs="*", help="these arms only")
    ap.add_argument("--epochs", default="1")
    args = ap.parse_args()
    done = set()
    if args.results.is_file():
        done = {json.loads(line)["arm"] for line in args.results.read_text().splitlines() if line.strip()}
    cpu = cpu_facts()
    for arm, flags in arms(args.data, args.docs).items():
        if arm in done or (args.only and arm not in args.only):
            continue
        out = args.runs / arm
        cmd = ["loratag", "train", *flags, "--epochs", args.epochs, "--out", str(out), "--overwrite"]
        start = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((out / "metrics.json").read_text())
        config = json.loads((out / "config.json").read_text())
        test = metrics["test"]
        row = {
            "arm": arm,
            "command": " ".join(cmd),
            "wall_seconds": round(time.monotonic() - start, 1),
            "steps": config["run"]["steps_per_epoch"],
            "train_sentences": config["run"]["train_sentences"],
            "best_validation_f1": metrics["best_validation_f1"],
            "test_f1": test["f1"],
            "test_f1_by_decode": {d: v["f1"] for d, v in test.get("by_decode", {}).items()},
            "test_untyped_f1": test["untyped"]["f1"],
            "test_sentences": test["sentences"],
            "test_characters": {k: test["characters"][k]["f1"] for k in ("exact", "boundary")}
            if "characters" in test
            else None,
            "data": config["run"]["data"],
            "cpu": cpu,
        }
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("arm", "wall_seconds", "test_f1", "test_characters")}), flush=True)


if __name__ == "__main__":
    main()
