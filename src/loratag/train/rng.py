"""The random state a checkpoint holds, so that a resumed epoch draws the same dropout masks: the CPU generator, and
on CUDA the device's generator too (dropout on a GPU draws from it, not from the CPU's)."""

from __future__ import annotations

import torch


def capture(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators dropout draws from on ``device``, as tensors (a checkpoint holds plain data only)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        if "cuda" not in state:
            raise ValueError("the checkpoint was written on a CPU and holds no CUDA random state; resume it on a CPU")
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every epoch's dropout starts from a seed of its own (a function of the run's seed, the epoch and the process),
    so an epoch begun after a resume draws what it would have drawn; ``manual_seed`` seeds CUDA too."""
    torch.manual_seed(seed * 1009 + epoch + 7919 * rank)
