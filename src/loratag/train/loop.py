"""Training: a plain loop that evaluates every epoch, keeps the best adapter, and resumes exactly after a crash.

The recipe: set up (session.py); plan the schedule, or resume it from the checkpoint; then for each epoch train,
evaluate, keep the best and checkpoint; finally score the best adapter on test and write the run directory (the
files are named in rundir.py). With --time-budget the plan comes from timing.py and may move as the run goes; the
loop reads its end from ``state.steps``, and every place that moves it assigns ``state.steps`` in this file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import rundir
from ..config import DECODINGS, Config
from ..encoding import IGNORE
from ..evaluation import document_scores, evaluate
from ..progress import bar as progress_bar
from ..tagger import Tagger
from .card import write_card
from .dist import Dist
from .frozen import low_precision_weights
from .headinit import init_head
from .optim import Optimizer
from .rng import capture as capture_rng
from .rng import restore as restore_rng
from .rng import seed_epoch
from .session import Session
from .state import Tally, TrainState
from .timing import Clock, replan, schedule

log = logging.getLogger("loratag")


def _attach_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / rundir.LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("loratag").addHandler(handler)
    logging.getLogger("loratag").setLevel(logging.INFO)
    return handler


def train(cfg: Config, out: str | Path, **kw) -> Path:
    """Train a LoRA adapter as ``cfg`` says and write the run directory ``out``; returns ``out``.
    Keywords as for ``train_and_load``."""
    return train_and_load(cfg, out, **kw)[0]


def train_and_load(
    cfg: Config,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after_steps: int | None = None,
    started: float | None = None,
) -> tuple[Path, Tagger]:
    """Train, write the run directory, and return it with the in-memory Tagger (best adapter loaded).

    ``resume``: continue from the last checkpoint in ``out`` with the settings saved there.
    ``stop_after_steps``: end early after that many optimizer steps in total (quick checks, tests).
    ``started``: ``time.monotonic()`` when the run began (the CLI's start), for ``--time-budget``; default: now.
    Under torchrun / accelerate launch each process trains on its shard; only rank 0 writes.
    """
    clock = Clock(time.monotonic() if started is None else started)
    out = Path(out)
    dist = Dist.from_env(device)
    handler = None
    try:
        error = None
        if dist.main:
            try:
                rundir.prepare(out, resume, overwrite)
            except (FileExistsError, FileNotFoundError) as e:
                error = e
        errors = [e for e in dist.gather(error) if e is not None]
        if errors:
            raise errors[0]
        if resume:
            cfg = Config.load(out / rundir.CONFIG)
        if dist.main:
            handler = _attach_log(out)
        before = clock.elapsed()  # the interpreter's start-up and the imports, since the process began
        session = Session(cfg, out, resume, progress and dist.main, dist.device(device), dist)
        session.setup = {"start-up and imports": before, **session.setup}
        with low_precision_weights(session.model, session.dtype, cfg.train.low_precision_weights):
            return _loop(session, clock, resume, stop_after_steps)
    finally:
        if handler is not None:
            logging.getLogger("loratag").removeHandler(handler)
            handler.close()
        dist.close()


def _loop(s: Session, clock: Clock, resume: bool, stop_after_steps: int | None) -> tuple[Path, Tagger]:
    cfg, dist, out = s.cfg, s.dist, s.out
    state, tallies, opt = _start_or_resume(s, clock, resume)  # a --time-budget plan times steps as they will run
    mine = tallies[dist.rank]
    if dist.main:
        rundir.write_json(out / rundir.CONFIG, {**cfg.to_dict(), "run": {**s.facts, "steps_per_epoch": state.steps}})
        rundir.write_json(out / rundir.LABELS, s.labels.label2id)
    trainable, total = s.facts["trainable_params"], s.facts["all_params"]
    log.info("loratag train: %s on %s -> %s", cfg.model, cfg.data or cfg.corpus.train, out)
    log.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total, 100 * trainable / total)
    log.info("effective batch: %s (%d process(es)), %d steps", s.facts["effective_batch"], dist.world,
             sum(state.steps))  # fmt: skip

    while state.epoch < len(state.steps) and not state.stopped_early:
        _train_epoch(s, clock, opt, state, mine, stop_after_steps)
        evaluation_started = time.monotonic()
        _evaluate_epoch(s, clock, state, mine)
        if state.budget and state.epoch < len(state.steps) and not state.stopped_early:
            state.steps = replan(s, clock, state, mine.seconds, time.monotonic() - evaluation_started)
            opt.ends_at(sum(state.steps))
        mine = Tally()
        _checkpoint(s, clock, opt, state, mine)
        if stop_after_steps is not None and state.global_step >= stop_after_steps:
            break
    return _finish(s, clock, state)


def _start_or_resume(s: Session, clock: Clock, resume: bool) -> tuple[TrainState, list[Tally], Optimizer]:
    saved = rundir.load_checkpoint(s.out) if resume else None
    if saved is None:
        if resume:
            log.info("no checkpoint yet; starting from the beginning")
        if s.cfg.train.head_init == "labels":  # before the budget's probes: they train from this head
            s.facts["head_init"] = init_head(s, s.cfg.train.seed)
        steps, budget = schedule(s, clock)
        state = TrainState(steps=steps, budget=budget)
        tallies = [Tally() for _ in range(s.dist.world)]
    else:
        state = TrainState.from_dict(saved["state"])
        tallies = [Tally.from_dict(t) for t in saved["ranks"]]
        if len(tallies) != s.dist.world:
            path = s.out / rundir.CHECKPOINT
            raise ValueError(f"{path}: the checkpoint was written by {len(tallies)} process(es); resume with as many")
        clock.add_spent(state.spent_seconds)  # a time budget counts the wall time before the crash too
        recorded = rundir.read_json(s.out / rundir.CONFIG)["run"]
        if "head_init" in recorded:  # config.json is written again below: keep what the run's start recorded
            s.facts["head_init"] = recorded["head_init"]
    planned = sum(state.budget.planned_steps) if state.budget else sum(state.steps)
    opt = Optimizer(s.model, s.cfg.train, planned, s.device, s.dtype)
    opt.ends_at(sum(state.steps))
    if saved is not None:
        params = dict(s.trainable)
        with torch.no_grad():
            for n, v in saved["trainable"].items():
                params[n].copy_(v)
        opt.load_state_dict(saved["optimizer"])
        log.info("resumed at epoch %d, step %d", state.epoch + 1, state.step_in_epoch)
    return state, tallies, opt


def _train_epoch(s: Session, clock: Clock, opt: Optimizer, state: TrainState, mine: Tally, stop_after: int | None):
    """Optimizer steps from where the state stands to the end of its epoch (or the budget's deadline)."""
    t, dist, epoch = s.cfg.train, s.dist, state.epoch
    plan, divisors = s.plan(epoch), s.divisors(epoch)
    if mine.rng is not None:
        restore_rng(mine.rng, s.device)  # mid-epoch resume: dropout continues exactly where it stopped
    else:
        seed_epoch(t.seed, epoch, dist.rank)
    budget = state.budget
    every, last_save = t.checkpoint_minutes * 60, time.monotonic()
    s.model.train()
    started = time.monotonic() - mine.seconds
    bar = progress_bar(state.steps[epoch], f"epoch {epoch + 1}/{len(state.steps)}", "step", s.progress,
                       state.step_in_epoch)  # fmt: skip
    with s.upper_layers():
        b = state.step_in_epoch - 1
        while (b := b + 1) < state.steps[epoch]:  # a budgeted run may move the epoch's end as it goes
            loss, loss_sum, gold, inputs = s.loss(plan[b][dist.rank :: dist.world], divisors[b])
            opt.step(loss, s.model)
            n_labels = int((gold != IGNORE).sum())
            mine.tokens += int(inputs["attention_mask"].sum())
            mine.loss_sum += loss_sum.item()
            mine.labels += n_labels
            state.step_in_epoch, state.global_step = b + 1, state.global_step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum.item() / max(1, n_labels):.4f}", refresh=False)
            if stop_after is not None and state.global_step >= stop_after:
                break
            if budget is not None and dist.any(clock.elapsed() > budget.deadline_s):
                log.info("time budget: stopping at step %d of epoch %d (the deadline)", b + 1, epoch + 1)
                state.stopped_early = True
                break
            every_n = budget.replan_every if budget is not None else 0
            due = every_n and (state.global_step % every_n == 0 or state.global_step == budget.first_replan)
            if due and b + 1 < state.steps[epoch]:
                state.steps = replan(s, clock, state, time.monotonic() - started)
                opt.ends_at(sum(state.steps))
                bar.total = state.steps[epoch]
                bar.refresh()
            if dist.any(bool(every) and time.monotonic() - last_save >= every and b + 1 < state.steps[epoch]):
                mine.seconds = time.monotonic() - started
                _checkpoint(s, clock, opt, state, mine)
                last_save = time.monotonic()
    bar.close()
    mine.seconds = time.monotonic() - started


def _evaluate_epoch(s: Session, clock: Clock, state: TrainState, mine: Tally) -> None:
    """Score validation, keep the adapter if it is the best so far, and move the state to the next epoch."""
    parts = s.dist.gather({k: getattr(mine, k) for k in ("loss_sum", "labels", "tokens", "seconds")})
    loss_sum, n_labels, tokens = (sum(p[k] for p in parts) for k in ("loss_sum", "labels", "tokens"))
    seconds = max(p["seconds"] for p in parts)
    started = time.monotonic()
    val = s.validate()
    entry = {
        "epoch": state.epoch + 1,
        "steps": state.step_in_epoch,
        "train_loss": loss_sum / max(1, n_labels),
        "train_seconds": seconds,
        "train_tokens": tokens,
        "train_tokens_per_second": tokens / seconds if seconds else None,
        "validation": val,
        "validation_seconds": round(time.monotonic() - started, 1),
        "wall_seconds": round(clock.elapsed(), 1),  # since the run began, evaluations included (for the curves)
    }
    improved = val["f1"] > state.best_f1
    if improved:
        state.best_f1, state.best_epoch = val["f1"], state.epoch + 1
    if s.dist.main:
        learned = s.learned()
        if improved:
            rundir.save_adapter(s.model, s.out / rundir.ADAPTER, learned)
        rundir.save_adapter(s.model, s.out / rundir.LAST, learned)
    state.history.append(entry)
    log.info(
        "epoch %d/%d  loss %.4f  val P %.4f R %.4f F1 %.4f untyped %.4f (%s)  %.0f s  %.0f tok/s%s",
        state.epoch + 1, len(state.steps), entry["train_loss"], val["precision"], val["recall"], val["f1"],
        val["untyped"]["f1"], val["decode"], seconds, entry["train_tokens_per_second"] or 0,
        "  (best)" if improved else "",
    )  # fmt: skip
    state.epoch, state.step_in_epoch = state.epoch + 1, 0


def _checkpoint(s: Session, clock: Clock, opt: Optimizer, state: TrainState, mine: Tally) -> None:
    """Every process's tally; inside an epoch also its random state, which resume puts back. At an epoch's end none
    is saved: the next epoch seeds itself (seed_epoch), resumed or not."""
    within = state.step_in_epoch > 0
    ranks = s.dist.gather({**asdict(mine), "rng": capture_rng(s.device) if within else None})
    state.spent_seconds = clock.elapsed()
    if s.dist.main:
        trainable = {n: p.detach().cpu().clone() for n, p in s.trainable}
        payload = {"state": state.to_dict(), "trainable": trainable, "ranks": ranks, "optimizer": opt.state_dict()}
        rundir.save_checkpoint(s.out, payload)


def _finish(s: Session, clock: Clock, state: TrainState) -> tuple[Path, Tagger]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    out, dist = s.out, s.dist
    dist.barrier()  # rank 0 has written adapter/
    set_peft_model_state_dict(s.model, load_file(out / rundir.ADAPTER / rundir.ADAPTER_WEIGHTS))
    s.keep_learned(out / rundir.ADAPTER)
    metrics = {
        "mode": state.history[-1]["validation"]["mode"],
        "decode": s.cfg.train.decode,
        "epochs": state.history,
        "best_epoch": state.best_epoch,
        "best_validation_f1": state.best_f1,
    }
    if state.budget:
        metrics["time_budget"] = {**state.budget.to_dict(), "stopped_early": state.stopped_early}
    if "test" in s.corpus.splits:
        started = time.monotonic()
        metrics["test"] = evaluate(s.evaluator, s.corpus.splits["test"], dist=dist, decodes=DECODINGS)
        if "test" in s.corpus.documents:  # read from documents: also scored on character spans, as predict tags
            metrics["test"]["characters"] = document_scores(s.evaluator, s.corpus.documents["test"])
        metrics["test_seconds"] = round(time.monotonic() - started, 1)
        test = metrics["test"]
        log.info(
            "test (best epoch %d): P %.4f R %.4f F1 %.4f untyped %.4f (%s)",
            state.best_epoch, test["precision"], test["recall"], test["f1"], test["untyped"]["f1"], test["decode"],
        )  # fmt: skip
    metrics["wall_seconds"] = round(clock.elapsed(), 1)
    if dist.main:
        rundir.write_json(out / rundir.METRICS, metrics)
        write_card(out, s.cfg, s.labels, metrics, rundir.read_json(out / rundir.CONFIG).get("run", {}))
        (out / rundir.CHECKPOINT).unlink(missing_ok=True)
    dist.barrier()
    s.model.eval()  # the returned Tagger predicts; dropout stays off
    return out, s.evaluator
