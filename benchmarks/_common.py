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
    """GFLOP/s of an n x n matmul in fp32 and bf16 on this machine, now. Where a dtype is emulated (bf16
    without AMX / AVX-512-BF16 runs at well under 1 GFLOP/s), a 256 x 256 matmul measures it instead."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        small = torch.randn(256, 256, dtype=dtype)
        small @ small
        t = time.perf_counter()
        small @ small
        size = n if 2 * 256**3 / (time.perf_counter() - t) > 20e9 else 256  # under 20 GFLOP/s: emulated
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(repeat):
            a @ b
        out[name] = round(2 * size**3 * repeat / (time.perf_counter() - t) / 1e9, 1)
    return out


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def cpu_facts() -> dict:
    """What decides the figures on this machine: the CPU model, its bf16 kind, the flags that matter, torch's
    capability string and thread count (benchmarks print this beside their numbers)."""
    import platform
    from pathlib import Path

    import torch

    from loratag.precision import cpu_bf16, cpu_features

    flags, capability = cpu_features()
    model = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return {
        "model": model or platform.processor(),
        "bf16": cpu_bf16(),
        "flags": sorted(f for f in flags if f in wanted),
        "torch_capability": capability,
        "torch_threads": torch.get_num_threads(),
    }


def torch_ao_int8(model, per_channel: bool):
    """torch.ao's quantize_dynamic on every Linear (per tensor, or per output channel): what --quantize int8 ran
    before ONNX Runtime, kept as the reference arm of bench_int8.py and study_int8.py. Deprecated in torch; its
    warning is silenced."""
    import warnings

    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {n: qconfig for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, spec, dtype=torch.qint8)
