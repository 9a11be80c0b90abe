"""Data-parallel training on this machine: 1 process against 2 processes under torchrun (gloo), same data,
same effective batch, same seed. Prints one JSON line: training tokens per second and peak memory (summed
over all processes of the run) for each, and the F1 of both.

    python benchmarks/bench_ddp.py [--train-sentences 1000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _tree_rss_mib(root: int) -> float:
    """Summed resident memory of a process and all its descendants (torchrun may start its workers in
    sessions of their own, so the process group is not enough)."""
    parents, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss[int(d.name)] = int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(frontier)
    return sum(rss.get(p, 0) for p in tree) / 1024


def run(cmd: list[str], env: dict) -> float:
    """Runs ``cmd``; returns the peak of the summed resident memory of it and its descendants (MiB)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mib(proc.pid))
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    err = proc.stderr.read().decode()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    t.join()
    return round(peak, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-sentences", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="effective batch (split across processes)")
    a = p.parse_args()
    common = [
        "--model",
        a.model,
        "--data",
        a.data,
        "--epochs",
        str(a.epochs),
        "--max-train-sentences",
        str(a.train_sentences),
        "--checkpoint-minutes",
        "0",
    ]
    out = {"train_sentences": a.train_sentences, "epochs": a.epochs, "effective_batch": a.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            run_dir = Path(tmp) / f"p{procs}"
            args = ["train", *common, "--batch-size", str(a.batch_size // procs), "--out", str(run_dir)]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // procs))}
            launch = [*TORCHRUN, f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable]
            peak = run([*launch, "-m", "loratag", *args], env)
            m = json.loads((run_dir / "metrics.json").read_text())
            seconds = sum(e["train_seconds"] for e in m["epochs"])
            tokens = sum(e["train_tokens"] for e in m["epochs"])
            out[f"processes_{procs}"] = {
                "tokens_per_s": round(tokens / seconds, 1),
                "train_s": round(seconds, 1),
                "peak_rss_mib_all_processes": peak,
                "threads_per_process": env["OMP_NUM_THREADS"],
                "validation_f1": m["epochs"][-1]["validation"]["f1"],
                "test_f1": m["test"]["f1"],
            }
    out["speedup"] = round(out["processes_2"]["tokens_per_s"] / out["processes_1"]["tokens_per_s"], 2)
    out["cpu"] = cpu_facts()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
