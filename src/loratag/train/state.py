"""Where training stands: what a checkpoint holds (with the trainable weights and the optimizer), and what resume
continues from. Plain values and tensors only, so a checkpoint loads without unpickling code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .budget import Budget


@dataclass
class Tally:
    """One process's counts since its epoch began (a checkpoint holds every process's)."""

    loss_sum: float = 0.0
    labels: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rng: dict[str, torch.Tensor] | None = None  # the dropout generators at a mid-epoch checkpoint (train.rng)

    @classmethod
    def from_dict(cls, d: dict) -> Tally:
        return cls(**d)


@dataclass
class TrainState:
    steps: list[int]  # the schedule: optimizer steps in each epoch (with a time budget the last may be partial)
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    best_f1: float = -1.0
    best_epoch: int | None = None
    spent_seconds: float = 0.0  # wall time of the run up to the checkpoint (a resumed budget continues from it)
    budget: Budget | None = None  # how a --time-budget run plans its schedule
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        budget = Budget.from_dict(d["budget"]) if d.get("budget") else None
        return cls(**{**d, "budget": budget})
