"""Shared by the benchmark scripts: run each arm in a fresh process (alone: never two at once) and read its
peak resident memory; measure the machine's matmul peak in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_arm(script: str, arm: str, args: list[str]) -> dict:
    """Run ``script --arm ARM ARGS`` in a child process; its last stdout line is a JSON object.
    Adds ``peak_rss_mib`` (the child's maximum resident set) and ``wall_s``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, script, "--arm", arm, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"arm {arm} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def matmul_peak(n: int = 2048, repeat: int = 5) -> dict:
    """GFLOP/s of an n x n matmul in fp32 and bf16 on this machine, now."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(repeat):
            a @ b
        out[name] = round(2 * n**3 * repeat / (time.perf_counter() - t) / 1e9, 1)
    return out


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)
