"""What a --time-budget run measures and how it feeds the planner (budget.py): the run's clock, timed samples of
training steps and of an evaluation, and the figures every process agrees on before a plan is made."""

from __future__ import annotations

import logging
import math
import random
import time

import torch

from ..config import DECODINGS
from ..encoding import PASS_TOKENS, encode, inference_batches, padded_length
from ..evaluation import evaluate
from .budget import Budget, first_plan
from .session import Session
from .state import TrainState

log = logging.getLogger("loratag")

# training steps timed for the first plan, after untimed warm-up steps: few, since their gradients are thrown away
# (time not spent training) and the plan is made again from the real steps early on (budget.EARLY_REPLAN_STEP)
PROBE_STEPS, PROBE_WARM_STEPS = 6, 2
PROBE_SENTENCES = 192  # validation sentences evaluated (twice) to time an evaluation


class Clock:
    """Seconds since the run began: since the process started (the CLI passes it), and on resume the wall time
    the run had spent before the crash too."""

    def __init__(self, started: float):
        self.started = started

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add_spent(self, seconds: float) -> None:
        self.started -= seconds


def seconds_per_padded_token(s: Session) -> float:
    """Forward and backward passes (no optimizer step; the gradients are thrown away) on a random sample of the
    first epoch's batches; the RNG is put back, so the run trains as it would have."""
    rng = torch.get_rng_state()
    plan = s.plan(0)
    picks = random.Random(s.cfg.train.seed).sample(range(len(plan)), min(len(plan), PROBE_STEPS + PROBE_WARM_STEPS))
    seconds, tokens = 0.0, 0
    s.model.train()
    with s.upper_layers():
        for k, b in enumerate(picks):
            started = time.perf_counter()
            loss, *_ = s.loss(plan[b][s.dist.rank :: s.dist.world], 1.0)
            loss.backward()
            s.model.zero_grad(set_to_none=True)
            if k >= PROBE_WARM_STEPS or len(picks) <= PROBE_WARM_STEPS:
                seconds += time.perf_counter() - started
                tokens += s.padded(plan[b])
    torch.set_rng_state(rng)
    return seconds / max(1, tokens)


def seconds_per_eval_work(s: Session) -> float:
    """An evaluation as it will run (forward passes, both decodings, the scores) on every n-th validation sentence,
    per unit of ``eval_work`` (a sample's batches mix lengths and pad more than the whole split's). The sample is
    evaluated twice and the second is timed: a first evaluation pays one-off costs (kernels for each new shape,
    buffers) that made the estimate run long (docs/study.md has the measurements)."""
    val = s.corpus.splits["validation"]
    picked = val[:: max(1, len(val) // PROBE_SENTENCES)]
    evaluate(s.evaluator, picked, decodes=DECODINGS)  # warm-up, not timed
    started = time.perf_counter()
    evaluate(s.evaluator, picked, decodes=DECODINGS)
    return (time.perf_counter() - started) / max(1, eval_work(s, picked))


def eval_work(s: Session, sentences) -> int:
    """The work of evaluating these sentences as the Tagger batches them: padded tokens of each forward pass, plus a
    pass's fixed cost (in tokens, as ``inference_batches`` counts it)."""
    if not sentences:
        return 0
    words = [x.tokens for x in sentences]
    contexts = s.evaluator.contexts(words, [x.doc for x in sentences])
    windows, _ = encode(
        s.tokenizer, words, s.max_length, contexts=contexts, context=s.cfg.train.context, case=s.cfg.train.case
    )
    lengths = [len(w.input_ids) for w in windows]
    groups = inference_batches(lengths, s.cfg.train.eval_batch_size)
    return sum(PASS_TOKENS + len(g) * padded_length(max(lengths[i] for i in g)) for g in groups)


DEFAULT_EPOCHS = 4  # without --epochs: this many, or enough for --min-steps (docs/study.md)


def epochs_to_train(s: Session) -> int:
    """``--epochs`` as given; else 4, or more where 4 epochs are fewer than ``--min-steps`` steps (a small corpus)."""
    t = s.cfg.train
    if t.epochs is not None:
        return t.epochs
    per_epoch = max(1, len(s.plan(0)))
    epochs = max(DEFAULT_EPOCHS, math.ceil(t.min_steps / per_epoch))
    if epochs > DEFAULT_EPOCHS:
        log.info(
            "%d epochs: %d steps per epoch, and --min-steps %d asks for at least that many (a small corpus)",
            epochs, per_epoch, t.min_steps,
        )  # fmt: skip
    return epochs


def schedule(s: Session, clock: Clock) -> tuple[list[int], Budget | None]:
    """Optimizer steps per epoch: ``--epochs`` full epochs, or what fits in ``--time-budget`` (timed here)."""
    t, gather = s.cfg.train, s.dist.gather
    if t.time_budget is None:
        return [len(s.plan(e)) for e in range(epochs_to_train(s))], None
    phase = time.monotonic()
    per_token = max(gather(seconds_per_padded_token(s)))
    s.setup["probe steps"], phase = time.monotonic() - phase, time.monotonic()
    per_work = max(gather(seconds_per_eval_work(s)))
    s.setup["probe evaluation"] = time.monotonic() - phase
    mine = {k: v[s.dist.rank :: s.dist.world] for k, v in s.corpus.splits.items()}
    val_s = max(gather(1.1 * per_work * eval_work(s, mine["validation"])))
    test_s = max(gather(1.1 * per_work * eval_work(s, mine.get("test", []))))
    setup_s = max(gather(clock.elapsed()))
    steps, budget = first_plan(t.time_budget * 60, setup_s, per_token, val_s, test_s, s.step_tokens)
    log.info(
        "time budget %.1f min: setup %.0f s, %s steps in %d epoch(s), evaluations ~%.0f s each",
        t.time_budget, setup_s, steps, len(steps), val_s,
    )  # fmt: skip
    budget.setup_parts = {k: round(v, 1) for k, v in s.setup.items()}
    log.info("setup %.0f s: %s", setup_s, ", ".join(f"{k} {v:.1f} s" for k, v in budget.setup_parts.items()))
    return steps, budget


def replan(s: Session, clock: Clock, state: TrainState, train_s: float, val_s: float | None = None) -> list[int]:
    """The schedule again from the time the steps really took (a machine's speed drifts, and the first plan rests on
    a sample): within an epoch from its steps so far (``train_s``), and after an epoch from the whole epoch and its
    evaluation (``val_s``), which also rescales the test evaluation's estimate. Returns the new steps per epoch."""
    budget, gather = state.budget, s.dist.gather
    if val_s is None:  # within an epoch
        epoch, done, val_s = state.epoch, state.step_in_epoch, budget.validation_s
    else:
        epoch, done = state.epoch - 1, state.history[-1]["steps"]
        val_s = max(gather(val_s))
        budget.timed_validation(val_s)
    per_token = max(gather(train_s / max(1, sum(s.step_tokens(epoch)[:done]))))
    now = max(gather(clock.elapsed()))
    within = state.step_in_epoch if epoch == state.epoch else 0
    steps = budget.replan(state.steps, state.epoch, within, state.global_step, now, per_token, val_s, s.step_tokens)
    log.debug("time budget: at step %d, %.0f s in: %s steps", state.global_step, now, steps)
    return steps
