"""The --time-budget planner: from numbers (seconds per padded token, the padded tokens of each step, what an
evaluation and setup take, the time spent) to a plan (optimizer steps per epoch) that ends inside the budget.

Pure: no model, no clock, no processes. The training loop measures, gathers the figures of every process, calls
``first_plan`` once and ``Budget.replan`` as it goes, and takes the plan it gets back as its end of schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

# what follows the last step: saving the adapter and the card, and the exit; a fixed part and a share of the budget
END_FIXED_S, END_SHARE = 2.0, 0.01
REPLANS_PER_RUN = 8  # the plan is made again every 1/8 of the planned steps (and after every epoch)
EARLY_REPLAN_STEP = 24  # and once early, from real steps: the first plan rests on a few probe steps only
MAX_EPOCHS = 10_000

StepTokens = Callable[[int], Sequence[int]]  # epoch -> padded tokens of each of its steps (this process's share)


@dataclass
class Budget:
    """A --time-budget run's plan and what it rests on (metrics.json records it as ``time_budget``)."""

    budget_s: float  # the whole run, start to exit
    setup_s: float  # spent before the first step
    test_s: float  # the test evaluation at the end, estimated
    test_per_validation: float  # the ratio of their work: rescales test_s once a validation has been timed
    validation_s: float = 0.0  # one validation, estimated
    train_s_per_1k_padded_tokens: float = 0.0
    deadline_s: float = 0.0  # no step starts after this (seconds into the run)
    planned_steps: list[int] = field(default_factory=list)  # the first plan
    replan_every: int = 0  # steps
    first_replan: int = 0  # an early replan at this step (0: none), before the first of every replan_every
    setup_parts: dict = field(default_factory=dict)  # where setup_s went: start-up and imports, data, model, ...
    replanned: list[dict] = field(default_factory=list)  # each later plan: at which step, when, what

    @property
    def end_s(self) -> float:
        return END_FIXED_S + END_SHARE * self.budget_s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Budget:
        return cls(**d)

    def fit(
        self, tokens: StepTokens, first_epoch: int, now: float, per_token: float, val_s: float, done: int = 0
    ) -> list[int]:
        """Steps per epoch from ``first_epoch`` on (of which ``done`` steps are behind): whole epochs, then a partial
        one, while their steps, an evaluation after each, the test evaluation and the end fit in what is left of
        the budget at ``now`` seconds into the run. Records the figures it used and the deadline."""
        left = self.budget_s - now - self.test_s - self.end_s
        self.train_s_per_1k_padded_tokens = round(1000 * per_token, 4)
        self.validation_s = round(val_s, 1)
        self.deadline_s = round(self.budget_s - val_s - self.test_s - self.end_s, 1)
        steps: list[int] = []
        for epoch in range(first_epoch, first_epoch + MAX_EPOCHS):
            behind = done if epoch == first_epoch else 0
            costs = [per_token * n for n in tokens(epoch)[behind:]]
            if sum(costs) + val_s <= left:
                steps.append(behind + len(costs))
                left -= sum(costs) + val_s
                continue
            n, spent = 0, 0.0
            while n < len(costs) and spent + costs[n] <= left - val_s:
                spent += costs[n]
                n += 1
            if behind + n:
                steps.append(behind + n)
            break
        return steps

    def timed_validation(self, val_s: float) -> None:
        """A validation has been timed: the test evaluation's estimate follows it (the ratio of their work)."""
        self.test_s = round(1.05 * val_s * self.test_per_validation, 1)

    def replan(
        self,
        steps: list[int],
        epoch: int,
        within: int,
        global_step: int,
        now: float,
        per_token: float,
        val_s: float,
        tokens: StepTokens,
    ) -> list[int]:
        """The whole schedule again, from ``epoch`` on (``within`` of its steps taken), from what the steps really
        took (``per_token``) at ``now``; the epochs before ``epoch`` stay as they ran. The learning rate then decays
        to 0 at the new end."""
        new = steps[:epoch] + self.fit(tokens, epoch, now, per_token, val_s, within)
        self.replanned.append({"at_step": global_step, "at_s": round(now, 1), "steps": new})
        return new


def first_plan(
    budget_s: float, setup_s: float, per_token: float, val_s: float, test_s: float, tokens: StepTokens
) -> tuple[list[int], Budget]:
    """The first plan, from a timed sample of steps (``per_token``) and of an evaluation (``val_s``, ``test_s``)."""
    budget = Budget(budget_s, round(setup_s, 1), round(test_s, 1), round(test_s / max(val_s, 1e-9), 4))
    steps = budget.fit(tokens, 0, setup_s, per_token, val_s)
    if not steps:
        raise ValueError(
            f"--time-budget {budget_s / 60:g} min is too short: setting up took {setup_s:.0f} s and evaluating "
            f"validation and test needs ~{val_s + test_s:.0f} s, which leaves no time to train"
        )
    budget.planned_steps = list(steps)
    budget.replan_every = max(8, math.ceil(sum(steps) / REPLANS_PER_RUN))
    budget.first_replan = EARLY_REPLAN_STEP if EARLY_REPLAN_STEP < min(budget.replan_every, sum(steps)) else 0
    return steps, budget
