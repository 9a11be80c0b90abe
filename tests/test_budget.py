"""The --time-budget planner: pure functions of plain numbers (budget.py), the glue that times a run and feeds it
(timing.py), and budgeted runs through the training loop."""

import json
from dataclasses import replace

import pytest
import torch

from loratag.train import timing, train_and_load
from loratag.train.budget import Budget, first_plan

TEN_STEPS = lambda epoch: [100] * 10  # noqa: E731  (10 steps of 100 padded tokens in every epoch)


def test_a_plan_is_whole_epochs_then_a_partial_one():
    # 1 s per step (0.01 s per token), 2 s per validation, 3 s for test, set up in 1 s, 60 s in all: 2.6 s at the end
    steps, budget = first_plan(60.0, 1.0, 0.01, 2.0, 3.0, TEN_STEPS)
    # 53.4 s to spend: 4 epochs of 12 s (48), then 3 steps and a validation (5) of the 5.4 left
    assert steps == [10, 10, 10, 10, 3] and budget.planned_steps == steps
    assert budget.deadline_s == pytest.approx(60 - 2 - 3 - 2.6)
    assert budget.replan_every == 8 and budget.train_s_per_1k_padded_tokens == 10.0 and budget.validation_s == 2.0
    assert budget.test_per_validation == 1.5


def test_a_plan_from_a_few_probe_steps_is_made_again_early():
    many = lambda epoch: [100] * 400  # noqa: E731
    steps, budget = first_plan(420.0, 1.0, 0.01, 2.0, 3.0, many)  # 1 s a step: ~400 steps fit
    assert budget.replan_every > 40 and budget.first_replan == 24  # from real steps, well before step 50
    assert first_plan(60.0, 1.0, 0.01, 2.0, 3.0, TEN_STEPS)[1].first_replan == 0  # replans come at 8 steps anyway
    assert timing.PROBE_STEPS + timing.PROBE_WARM_STEPS < 24  # fewer steps thrown away than the early replan reads


def test_a_budget_too_short_to_train_says_so():
    with pytest.raises(ValueError, match="too short: setting up took 55 s and evaluating validation and test needs"):
        first_plan(60.0, 55.0, 0.01, 2.0, 3.0, TEN_STEPS)


def test_a_plan_made_again_within_an_epoch_follows_the_steps_real_time():
    steps, budget = first_plan(60.0, 1.0, 0.1, 2.0, 3.0, TEN_STEPS)  # 10 s a step: 5 steps fit
    assert steps == [5]
    faster = budget.replan(steps, 0, 2, 2, 3.0, 0.001, 2.0, TEN_STEPS)  # really 0.1 s a step: many epochs fit
    assert faster[0] == 10 and len(faster) > 1
    assert budget.replanned[-1] == {"at_step": 2, "at_s": 3.0, "steps": faster}
    slower = budget.replan(steps, 0, 2, 2, 3.0, 1.0, 2.0, TEN_STEPS)  # 100 s a step: the epoch ends where it stands
    assert slower == [2]


def test_a_plan_made_again_keeps_the_epochs_behind_it():
    steps, budget = first_plan(600.0, 1.0, 0.01, 2.0, 3.0, TEN_STEPS)
    new = budget.replan([10, 10, 4], 2, 0, 20, 30.0, 0.01, 2.0, TEN_STEPS)
    assert new[:2] == [10, 10] and len(new) > 3


def test_a_timed_validation_rescales_the_test_estimate():
    _, budget = first_plan(60.0, 1.0, 0.01, 2.0, 4.0, TEN_STEPS)
    budget.timed_validation(10.0)
    assert budget.test_s == pytest.approx(1.05 * 10.0 * 2.0)


def test_a_budget_goes_through_a_checkpoint_as_plain_values():
    _, budget = first_plan(60.0, 1.0, 0.01, 2.0, 3.0, TEN_STEPS)
    budget.replan([10], 0, 5, 5, 7.0, 0.01, 2.0, TEN_STEPS)
    assert Budget.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget


def test_the_learning_rate_reaches_zero_at_the_end_the_loop_sets():
    from loratag.config import TrainConfig
    from loratag.train.optim import Optimizer

    model = torch.nn.Linear(3, 2)
    opt = Optimizer(model, TrainConfig(lr=1e-3, warmup_ratio=0.0), 100, torch.device("cpu"), None)
    opt.ends_at(10)
    for _ in range(10):
        opt.optimizer.step()
        opt.scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.0


# ---- timing.py: a session measured and planned -----------------------------------------------------------------


def test_schedule_times_the_session_and_plans_from_it(tiny_cfg, tmp_path, monkeypatch):
    from loratag.train.dist import Dist
    from loratag.train.session import Session

    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, time_budget=1.0))
    s = Session(cfg, tmp_path, False, False, torch.device("cpu"), Dist())
    monkeypatch.setattr(timing, "seconds_per_padded_token", lambda s: 0.01)
    monkeypatch.setattr(timing, "seconds_per_eval_work", lambda s: 0.1)
    clock = timing.Clock(0.0)
    monkeypatch.setattr(clock, "elapsed", lambda: 1.0)
    steps, budget = timing.schedule(s, clock)
    val_s = 1.1 * 0.1 * timing.eval_work(s, s.corpus.splits["validation"])
    test_s = 1.1 * 0.1 * timing.eval_work(s, s.corpus.splits["test"])
    expected, _ = first_plan(60.0, 1.0, 0.01, val_s, test_s, s.step_tokens)
    assert steps == expected and budget.validation_s == round(val_s, 1) and budget.setup_s == 1.0
    assert s.step_tokens(0) == [s.padded(b) for b in s.plan(0)]


# ---- through the training loop -------------------------------------------------------------------------------------


def test_a_budgeted_run_records_its_plan_and_stops_at_the_deadline(tiny_cfg, tmp_path, monkeypatch):
    """The deadline check: a run whose plan is too optimistic stops training when the deadline passes, then still
    evaluates, keeps the best and scores test."""
    import loratag.train.loop as loop

    monkeypatch.setattr(timing, "seconds_per_padded_token", lambda s: 1e-9)  # plans far more steps than fit
    monkeypatch.setattr(timing, "seconds_per_eval_work", lambda s: 1e-9)  # and evaluations
    monkeypatch.setattr(loop, "replan", lambda s, clock, state, *a: state.steps)  # and never learns better
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, time_budget=0.25))
    run, _ = train_and_load(cfg, tmp_path / "run", progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    budget = metrics["time_budget"]
    assert budget["stopped_early"] and sum(budget["planned_steps"]) > sum(e["steps"] for e in metrics["epochs"])
    assert metrics["test"]["f1"] >= 0 and metrics["best_epoch"] is not None


def test_a_budgeted_run_plans_again_from_what_its_epochs_really_took(tiny_cfg, tmp_path, monkeypatch):
    """A first plan resting on a far too fast sample is replaced after the first epoch by one from the measured
    epoch; the run then trains the new plan to its end (where the learning rate reaches 0)."""
    monkeypatch.setattr(timing, "seconds_per_padded_token", lambda s: 1e-9)
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, time_budget=0.25))
    run, _ = train_and_load(cfg, tmp_path / "run", progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    budget = metrics["time_budget"]
    assert budget["replanned"] and budget["replanned"][0]["at_step"] == metrics["epochs"][0]["steps"]
    final = budget["replanned"][-1]["steps"]
    assert sum(final) < sum(budget["planned_steps"])  # the first plan was far too long
    if not budget["stopped_early"]:
        assert sum(e["steps"] for e in metrics["epochs"]) == sum(final)


def test_a_budgeted_run_whose_first_plan_is_short_trains_on(tiny_cfg, tmp_path, monkeypatch):
    """A first plan of 6 steps of an 8-step epoch is re-planned at step 4 from the steps' real time, and the run goes
    on past step 6 (the loop follows the epoch's moving end)."""
    planned = timing.first_plan

    def short(*a):
        steps, budget = planned(*a)
        budget.planned_steps, budget.replan_every = [6], 4
        return [6], budget

    monkeypatch.setattr(timing, "first_plan", short)
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, batch_size=1, time_budget=0.4))
    run, _ = train_and_load(cfg, tmp_path / "run", progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    budget = metrics["time_budget"]
    assert budget["planned_steps"] == [6] and budget["replanned"][0]["at_step"] == 4
    # where the set-up went, part by part, and the parts within the set-up time the plan used
    parts = budget["setup_parts"]
    assert list(parts) == ["start-up and imports", "data", "model", "tokenize", "probe steps", "probe evaluation"]
    assert all(v >= 0 for v in parts.values()) and sum(parts.values()) <= budget["setup_s"] + 0.2
    assert sum(e["steps"] for e in metrics["epochs"]) > 6
    assert metrics["test"]["f1"] >= 0
    # what the evaluations really took, beside what the plan expected (budget["validation_s"], budget["test_s"])
    assert all(e["validation_seconds"] >= 0 for e in metrics["epochs"]) and metrics["test_seconds"] >= 0


def test_the_budget_clock_starts_with_the_command_not_with_its_process(monkeypatch, tmp_path):
    """`pip install -e . && loratag train ...`: bash runs the last command in its own process, which /proc dates
    from before the install; and main() may be called in a process that has lived for hours. The budget's clock
    starts when the command does."""
    import time

    from loratag.cli import main
    from loratag.train import loop

    seen = {}

    def fake_train(cfg, out, **kw):
        seen["started"] = kw["started"]
        raise ValueError("stopped by the test")

    monkeypatch.setattr(loop, "train", fake_train)
    before = time.monotonic()
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--time-budget", "1"]) == 2
    assert before <= seen["started"] <= time.monotonic()
