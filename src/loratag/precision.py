"""Numeric precision: which dtype the forward passes run in, detected from the device (never assumed)."""

from __future__ import annotations

from pathlib import Path

import torch


def device_of(requested: str | None = None) -> torch.device:
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_features() -> tuple[frozenset[str], str]:
    """The CPU's flags (``/proc/cpuinfo``; empty where there is none) and torch's capability string
    (``AVX2``, ``AVX512``, ``AMX`` ...). Tests patch this to play each kind of machine."""
    flags: frozenset[str] = frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = frozenset(line.partition(":")[2].split())
                break
    except OSError:
        pass
    return flags, torch.backends.cpu.get_cpu_capability()


def cpu_bf16() -> str:
    """How this CPU runs bf16 matmuls: ``"amx"`` (Intel AMX), ``"avx512_bf16"`` (e.g. AMD Zen 4) or
    ``"emulated"`` (AVX2 and older, where bf16 is far slower than fp32; docs/precision.md has the measured ratios).
    Zen 4 reports torch capability ``AVX512``, not ``AVX512_BF16``: the flags are what tell."""
    flags, capability = cpu_features()
    if {"amx_bf16", "amx_tile"} <= flags or capability.startswith("AMX"):
        return "amx"
    if "avx512_bf16" in flags or capability == "AVX512_BF16":
        return "avx512_bf16"
    return "emulated"


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). ``auto``: bf16 on CPUs with AMX or AVX-512-BF16 and on CUDA GPUs
    that support it (fp16 on older GPUs), fp32 on every other CPU (there bf16 is emulated)."""
    if requested == "fp32":
        return None
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16() != "emulated" else None


def precision_name(dtype: torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: what metrics.json and config.json record."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
