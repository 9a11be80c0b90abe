"""The README's main job as a newcomer runs it: a fresh clone, its first set-up command exactly as the README writes
it (``pip install -e . && loratag train ... --time-budget 5``), run twice: first (nothing of the clone's built yet)
and warm. Per run: the wall time, where the set-up went (metrics.json ``time_budget.setup_parts``), the share of the
budget spent in training steps, the evaluations' times and the F1 it reached.

    python benchmarks/bench_main_job.py              # clones HEAD next to the repository (../shared resolves)
    python benchmarks/bench_main_job.py --runs 1

The clone's ``pip install -e .`` points the installed loratag at the clone; this script points it back at the
repository it ran from when it ends. Run it alone (two PyTorch processes on two cores slow each other ~10x).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, matmul_peak  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main_job_command() -> str:
    """The README's first set-up command (the line after the "main job" comment in the Set-up block)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [x.strip() for x in block.splitlines() if x.strip() and not x.strip().startswith("#")]
    command = lines[0]
    if "--time-budget" not in command:
        raise SystemExit(f"README's first set-up command has no --time-budget: {command}")
    return command


def one_run(clone: Path, command: str, label: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=clone, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    out = clone / re.search(r"--out (\S+)", command).group(1)
    m = json.loads((out / "metrics.json").read_text())
    budget = m["time_budget"]
    train_s = sum(e["train_seconds"] for e in m["epochs"])
    pip = re.search(r"^(.*?)&&", command)
    return {
        "run": label,
        "wall_s_command": round(wall, 1),
        "wall_s_loratag": m["wall_seconds"],  # from the loratag process's start to its end
        "budget_s": budget["budget_s"],
        "setup_s": budget["setup_s"],
        "setup_parts": budget.get("setup_parts"),
        "train_s": round(train_s, 1),
        "training_share_of_budget": round(train_s / budget["budget_s"], 3),
        "steps": sum(e["steps"] for e in m["epochs"]),
        "epochs": len(m["epochs"]),
        "validation_s": [e["validation_seconds"] for e in m["epochs"]],
        "test_s": m.get("test_seconds"),
        "validation_f1": m["best_validation_f1"],
        "test_f1": m["test"]["f1"],
        "test_untyped_f1": m["test"]["untyped"]["f1"],
        "decode": m["decode"],
        "pip_part": pip.group(1).strip() if pip else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="1: first run only; 2: first and warm")
    p.add_argument("--results", type=Path)
    a = p.parse_args()
    facts = cpu_facts()
    kind = {"emulated": "avx2"}.get(facts["bf16"], facts["bf16"].replace("_", ""))
    results = a.results or ROOT / "benchmarks" / "results" / f"main-job-{kind}.jsonl"
    command = main_job_command()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    clone = Path(tempfile.mkdtemp(prefix="fresh-", dir=ROOT.parent))  # beside the repository: ../shared resolves
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        rows = [one_run(clone, command, "first run in a fresh clone")]
        for k in range(1, a.runs):
            rows.append(one_run(clone, command, f"warm (run {k + 1})"))
        peak = matmul_peak()
    finally:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(ROOT), "--no-deps"], check=False)
        shutil.rmtree(clone, ignore_errors=True)
    stamp = {"command": command, "commit": commit.stdout.strip(), "cpu": facts, "matmul_peak_gflops": peak,
             "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    with results.open("a") as f:
        for r in rows:
            f.write(json.dumps({**stamp, **r}) + "\n")
            print(json.dumps(r))


if __name__ == "__main__":
    main()
