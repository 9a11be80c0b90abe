"""Training: a plain loop that evaluates every epoch, keeps the best adapter, and resumes after a crash.

The run directory is the contract (see README): config.json, labels.json, adapter/ (best by validation F1),
last/ (the last epoch's adapter), metrics.json, README.md (model card) and train.log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .card import write_card
from .config import DECODINGS, Config
from .data import load_corpus
from .dist import Dist
from .encoding import IGNORE, PASS_TOKENS, batches, collate, encode, inference_batches, padded_length
from .evaluation import evaluate
from .frozen import LayerCache, layers_only, low_precision_weights
from .inference import Tagger
from .labels import LabelSet
from .modeling import (
    autocast,
    build_model,
    count_parameters,
    encoder_layers,
    load_tokenizer,
    model_max_length,
    precision_name,
    resolve_model,
    resolve_precision,
)
from .progress import bar as progress_bar
from .runio import read_json, recover, save_adapter, write_json

log = logging.getLogger("loratag")
CHECKPOINT = "checkpoint.pt"


def _prepare_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / "config.json").is_file():
            raise FileNotFoundError(f"{out}: nothing to resume (no config.json); start it without --resume")
        if (out / "metrics.json").is_file() and not (out / CHECKPOINT).is_file():
            raise FileExistsError(f"{out}: this run has finished already (metrics.json); nothing to resume")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it or --resume")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _attach_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "train.log")
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
    started = time.monotonic() if started is None else started
    out = Path(out)
    dist = Dist.from_env(device)
    handler = None
    try:
        error = None
        if dist.main:
            try:
                _prepare_dir(out, resume, overwrite)
                if resume:
                    recover(out)
            except (FileExistsError, FileNotFoundError) as e:
                error = e
        errors = [e for e in dist.gather(error) if e is not None]
        if errors:
            raise errors[0]
        if resume:
            cfg = Config.load(out / "config.json")
        if dist.main:
            handler = _attach_log(out)
        return _train(cfg, out, resume, progress and dist.main, dist.device(device), stop_after_steps, dist, started)
    finally:
        if handler is not None:
            logging.getLogger("loratag").removeHandler(handler)
            handler.close()
        dist.close()


def _param_groups(model, weight_decay: float, lr: float, lora_plus_ratio: float = 1.0) -> list[dict]:
    # As transformers' Trainer (which the guide uses): no weight decay on biases and LayerNorm weights. LoRA+
    # (Hayou et al. 2024): the B matrices learn ``lora_plus_ratio`` times faster than the A matrices.
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = not (name.endswith("bias") or p.ndim == 1)
            groups.setdefault((decay, "lora_B" in name and lora_plus_ratio != 1.0), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * (lora_plus_ratio if b else 1.0)}
        for (decay, b), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]


def _trainable_state(trainable: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in trainable}


def _save_checkpoint(out: Path, payload: dict) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out / CHECKPOINT)  # atomic: a kill leaves the old checkpoint or the new one


def _epoch_plan(lengths: list[int], cfg: Config, epoch: int, world: int) -> list[list[int]]:
    """The global batches of one epoch (a function of the seed and the epoch, so resume and every rank agree).
    Under data parallelism a global batch holds ``world`` times the per-process batch."""
    t = cfg.train
    plan = batches(
        lengths,
        t.batch_size * world,
        t.batch_tokens * world if t.batch_tokens else None,
        seed=t.seed * 1009 + epoch,
        group=t.length_grouping,
    )
    if world > 1:  # every rank needs rows in every step: fold batches smaller than the world into a neighbour
        merged: list[list[int]] = []
        for b in plan:
            if merged and len(b) < world:
                merged[-1] = merged[-1] + b
            else:
                merged.append(b)
        if len(merged) > 1 and len(merged[0]) < world:
            merged[1] = merged[0] + merged[1]
            merged = merged[1:]
        plan = merged
    return plan


def _loss_divisors(plan: list[list[int]], windows, per_epoch: bool) -> list[float]:
    """What each global batch's summed token loss is divided by; the same on every process, so N processes
    compute the gradient one process would on the same global batch. Random batches (the guide): each batch's
    own labelled tokens, the Trainer's per-batch mean. Length-grouped batches: the epoch's mean labelled tokens
    per batch, a constant, because a per-batch mean would give every token of a batch of short sentences more
    weight than a token of long ones (every sentence about equal weight instead of every token)."""
    counts = [w.last - w.first for w in windows]
    per_batch = [sum(counts[i] for i in b) for b in plan]
    if per_epoch:
        return [sum(per_batch) / max(1, len(plan))] * len(plan)
    return [float(c) for c in per_batch]


def token_loss(logits: torch.Tensor, gold: torch.Tensor, divisor: float, world: int = 1):
    """``(loss to backpropagate, summed loss)``: the cross-entropy summed over this process's labelled tokens,
    divided by ``divisor`` (see ``_loss_divisors``) and multiplied by ``world`` because DDP averages gradients
    over processes. A batch with no labelled token (windows that own no words) gives a zero loss, not a
    division by zero."""
    loss_sum = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), gold.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum * (world / max(1, divisor)), loss_sum


@dataclass
class Tally:
    """One process's counts since its epoch began (a checkpoint holds every process's)."""

    loss_sum: float = 0.0
    labels: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rng: torch.Tensor | None = None  # the dropout RNG at a mid-epoch checkpoint


@dataclass
class TrainState:
    """Where training stands: with the trainable weights, the optimizer and each process's Tally, what a checkpoint
    holds, and what resume continues from."""

    steps: list[int]  # the schedule: optimizer steps in each epoch (with a time budget the last may be partial)
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    best_f1: float = -1.0
    best_epoch: int | None = None
    spent_seconds: float = 0.0  # wall time of the run up to the checkpoint (a resumed budget continues from it)
    budget: dict | None = None  # how a --time-budget run planned its schedule
    stopped_early: bool = False


@dataclass
class _Optimizer:
    """AdamW with the linear schedule, and the gradient scaler for fp16 on CUDA (a no-op otherwise)."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler

    @classmethod
    def build(cls, model, t, state: TrainState, device, dtype) -> _Optimizer:
        """The schedule is transformers' ``get_linear_schedule_with_warmup`` (linear warmup, then linear decay to 0
        at the last step), written out because a budgeted run moves its last step when it plans again: the total
        is read from the state at every step."""
        groups = _param_groups(model, t.weight_decay, t.lr, t.lora_plus_ratio)
        # fused: one kernel for all parameters, where the loop version runs ~10 small ops per tensor (LoRA has 216
        # tensors on MiniLM): a full fine-tuning step 1.40x faster, a LoRA step 0.95-1.09x (within noise;
        # bench_step.py, Zen 4 bf16). transformers' Trainer (the guide) uses it too: its default optim is
        # adamw_torch_fused.
        optimizer = torch.optim.AdamW(groups, lr=t.lr, fused=device.type in ("cpu", "cuda"))
        warmup = math.ceil(t.warmup_ratio * sum(state.budget["planned_steps"] if state.budget else state.steps))

        def factor(step: int) -> float:
            if step < warmup:
                return step / max(1, warmup)
            total = sum(state.steps)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
        return cls(optimizer, scheduler, scaler)

    def step(self, loss: torch.Tensor, model) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's default, as in the guide
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).state_dict() for k in ("optimizer", "scheduler", "scaler")}

    def load_state_dict(self, d: dict) -> None:
        for k in ("optimizer", "scheduler", "scaler"):
            getattr(self, k).load_state_dict(d[k])


class _Run:
    """What stays fixed while training: data, windows, model, evaluator, and how a batch reaches the model (token ids,
    or the cached hidden states below the adapted layers)."""

    def __init__(self, cfg: Config, out: Path, resume: bool, progress: bool, device, dist: Dist, started: float):
        t = cfg.train
        self.cfg, self.out, self.progress, self.device, self.dist, self.started = (
            cfg, out, progress, device, dist, started,
        )  # fmt: skip
        torch.manual_seed(t.seed)
        self.corpus = load_corpus(cfg.data)
        self.labels: LabelSet = self.corpus.labels
        if resume and (out / "labels.json").is_file():
            self.labels = LabelSet.load(out / "labels.json")
        train_set = self.corpus.splits["train"][: t.max_train_sentences]
        self.tokenizer = load_tokenizer(resolve_model(cfg.model))
        self.model = build_model(cfg, self.labels).to(device)
        # by their names in the whole model: a checkpoint inside an epoch is written while the cached layers are cut
        # out of it, when named_parameters() would number the remaining layers from 0
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.max_length = min(t.max_length or 10**9, model_max_length(self.tokenizer, self.model.config))
        windows, windowed = encode(self.tokenizer, [s.tokens for s in train_set], self.max_length, progress=progress)
        self.windows = [w for w in windows if w.last > w.first]  # a window that owns no word has nothing to learn
        self.label_ids = [[self.labels.label2id[x] for x in s.tags] for s in train_set]
        self.lengths = [len(w.input_ids) for w in self.windows]
        self.dtype = resolve_precision(t.precision, device)
        self.pad = self.tokenizer.pad_token_id or 0
        self._plans: dict[int, list[list[int]]] = {}
        self.cache, self.below = None, 0
        if cfg.lora.top_layers is not None:
            n = len(encoder_layers(self.model)[1])
            self.below = n - cfg.lora.adapted_layers(n)
            cache_started = time.monotonic()
            self.cache = LayerCache.build(
                self.model, self.windows, self.below, self.pad, self.dtype, device, t.eval_batch_size, progress
            )
            log.info(
                "cached layers 1-%d for %d windows: %.0f MiB %s in %.0f s", self.below, len(self.windows),
                self.cache.nbytes / 2**20, precision_name(self.dtype), time.monotonic() - cache_started,
            )  # fmt: skip
        self.evaluator = Tagger(
            self.model, self.tokenizer, self.labels, self.max_length, t.precision, t.eval_batch_size, device, t.decode
        )
        self.forward = self.model
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel

            # DDP buckets only parameters that require gradients (the LoRA weights and the head): the frozen base
            # is never all-reduced, and every trainable parameter is used in every step (no unused-parameter scan).
            self.forward = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False,
                gradient_as_bucket_view=True,
                # the model's buffers (position ids) are constants, the same on every rank; and while the cached
                # layers are cut out of the model, so are the embeddings' buffers DDP would broadcast
                broadcast_buffers=False,
            )
        trainable, total = count_parameters(self.model)
        per_process = f"<= {t.batch_tokens} tokens" if t.batch_tokens else t.batch_size
        self.facts = {
            "device": str(device),
            "autocast": precision_name(self.dtype),
            "max_length": self.max_length,
            "train_sentences": len(train_set),
            "train_windows": len(self.windows),
            "train_sentences_windowed": windowed,
            "train_subword_tokens_per_epoch": sum(self.lengths),
            "processes": dist.world,
            "batch_per_process": per_process,
            "effective_batch": f"{dist.world} x {per_process}" if dist.active else per_process,
            "trainable_params": trainable,
            "all_params": total,
            "cached_layers": self.below,
            "adapted_layers": len(encoder_layers(self.model)[1]) - self.below if self.cache is not None else "all",
            "cache_bytes": self.cache.nbytes if self.cache is not None else 0,
            "torch_threads": torch.get_num_threads(),
        }

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans[epoch] = _epoch_plan(self.lengths, self.cfg, epoch, self.dist.world)
        return self._plans[epoch]

    def divisors(self, epoch: int) -> list[float]:
        return _loss_divisors(self.plan(epoch), self.windows, self.cfg.train.length_grouping)

    def feed(self, rows: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs and gold labels for these windows."""
        batch = collate([self.windows[i] for i in rows], self.pad, self.label_ids)
        gold = batch.pop("labels")
        if self.cache is not None:  # the hidden states below the adapted layers instead of the token ids
            states = self.cache.states(rows, gold.shape[1])
            batch = {"inputs_embeds": states, "attention_mask": batch["attention_mask"]}
        return {k: v.to(self.device) for k, v in batch.items()}, gold.to(self.device)

    def upper_layers(self):
        """The training forward: only the adapted layers when the ones below are cached."""
        if self.cache is None:
            return contextlib.nullcontext()
        return layers_only(self.model, self.below, None, cached_input=True)

    def loss(self, rows: list[int], divisor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        inputs, gold = self.feed(rows)
        with autocast(self.device, self.dtype):
            logits = self.forward(**inputs).logits
        loss, loss_sum = token_loss(logits, gold, divisor, self.dist.world)
        return loss, loss_sum, gold, inputs

    def validate(self) -> dict:
        return evaluate(self.evaluator, self.corpus.splits["validation"], self.progress, self.dist, DECODINGS)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- the schedule ---------------------------------------------------------------------------------------------

    def schedule(self) -> tuple[list[int], dict | None]:
        """Optimizer steps per epoch: ``--epochs`` full epochs, or what fits in ``--time-budget``."""
        t = self.cfg.train
        if t.time_budget is None:
            return [len(self.plan(e)) for e in range(t.epochs)], None
        return self._fit_budget(t.time_budget * 60)

    def _fit_budget(self, budget: float) -> tuple[list[int], dict]:
        """Time a sample of training steps and an evaluation, then plan the epochs that fit (``_fit``)."""
        per_token = max(self.dist.gather(self._seconds_per_padded_token()))
        per_work = max(self.dist.gather(self._seconds_per_eval_work()))
        mine = {k: v[self.dist.rank :: self.dist.world] for k, v in self.corpus.splits.items()}
        val_s = max(self.dist.gather(1.1 * per_work * self._eval_work(mine["validation"])))
        test_s = max(self.dist.gather(1.1 * per_work * self._eval_work(mine.get("test", []))))
        setup_s = max(self.dist.gather(self.elapsed()))
        plan = {"budget_s": budget, "setup_s": round(setup_s, 1), "test_s": round(test_s, 1), "replanned": []}
        plan["test_per_validation"] = round(test_s / max(val_s, 1e-9), 4)  # the ratio of their work
        steps = self._fit(plan, 0, setup_s, per_token, val_s)
        if not steps:
            raise ValueError(
                f"--time-budget {budget / 60:g} min is too short: setting up took {setup_s:.0f} s and evaluating "
                f"validation and test needs ~{val_s + test_s:.0f} s, which leaves no time to train"
            )
        plan["planned_steps"] = steps
        plan["replan_every"] = max(8, math.ceil(sum(steps) / 8))  # steps; and after every epoch
        log.info(
            "time budget %.1f min: setup %.0f s, %s steps in %d epoch(s), evaluations ~%.0f s each",
            budget / 60, setup_s, steps, len(steps), val_s,
        )  # fmt: skip
        return steps, plan

    def _fit(self, plan: dict, first_epoch: int, now: float, per_token: float, val_s: float, done: int = 0):
        """Steps per epoch from ``first_epoch`` on (of which ``done`` steps are behind): whole epochs (and then a
        partial one) while their steps, an evaluation after each, the test evaluation and the end fit in what is
        left of the budget at ``now`` seconds into the run. Sets the deadline after which no step starts."""
        budget, test_s = plan["budget_s"], plan["test_s"]
        end_s = 2.0 + 0.01 * budget  # saving the adapter, the card, the exit
        left = budget - now - test_s - end_s
        plan.update(
            train_s_per_1k_padded_tokens=round(1000 * per_token, 4),
            validation_s=round(val_s, 1),
            deadline_s=round(budget - val_s - test_s - end_s, 1),
        )
        steps: list[int] = []
        for epoch in range(first_epoch, first_epoch + 10_000):
            behind = done if epoch == first_epoch else 0
            costs = [per_token * self._padded(b) for b in self.plan(epoch)[behind:]]
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

    def replan(self, state: TrainState, train_s: float, val_s: float | None = None) -> None:
        """Plan the rest of a budgeted run again from the time its steps really took (a machine's speed drifts,
        and the first plan rests on a sample of steps): every ``replan_every`` steps from the steps of the epoch
        so far, and after each epoch from the whole epoch and its evaluation (``val_s``), which also rescales the
        test evaluation's estimate. The learning rate then decays to 0 at the new end."""
        budget = state.budget
        if val_s is None:  # within an epoch
            epoch, done, val_s = state.epoch, state.step_in_epoch, budget["validation_s"]
        else:
            epoch, done = state.epoch - 1, state.history[-1]["steps"]
            val_s = max(self.dist.gather(val_s))
            budget["test_s"] = round(1.05 * val_s * budget.get("test_per_validation", 0.0), 1)
        tokens = sum(self._padded(b) for b in self.plan(epoch)[:done])
        per_token = max(self.dist.gather(train_s / max(1, tokens)))
        now = max(self.dist.gather(self.elapsed()))
        within = state.step_in_epoch if epoch == state.epoch else 0
        state.steps = state.steps[: state.epoch] + self._fit(budget, state.epoch, now, per_token, val_s, within)
        budget["replanned"].append({"at_step": state.global_step, "at_s": round(now, 1), "steps": state.steps})
        log.debug("time budget: at step %d, %.0f s in: %s steps", state.global_step, now, state.steps)

    def _padded(self, rows: list[int]) -> int:
        """Padded sub-word tokens of a process's share of a global batch (rows x longest, rounded up to 8)."""
        mine = rows[self.dist.rank :: self.dist.world] or rows[:1]
        return len(mine) * padded_length(max(self.lengths[i] for i in mine))  # as collate pads

    def _seconds_per_padded_token(self, sample: int = 24, warm: int = 2) -> float:
        """Forward and backward passes (no optimizer step; the gradients are thrown away) on a random sample of
        the first epoch's batches; the RNG is put back, so the run trains as it would have."""
        rng = torch.get_rng_state()
        plan = self.plan(0)
        picks = random.Random(self.cfg.train.seed).sample(range(len(plan)), min(len(plan), sample + warm))
        seconds, tokens = 0.0, 0
        self.model.train()
        with self.upper_layers():
            for k, b in enumerate(picks):
                started = time.perf_counter()
                loss, *_ = self.loss(plan[b][self.dist.rank :: self.dist.world], 1.0)
                loss.backward()
                self.model.zero_grad(set_to_none=True)
                if k >= warm or len(picks) <= warm:
                    seconds += time.perf_counter() - started
                    tokens += self._padded(plan[b])
        torch.set_rng_state(rng)
        return seconds / max(1, tokens)

    def _seconds_per_eval_work(self, sample: int = 192) -> float:
        """An evaluation as it will run (forward passes, both decodings, the scores) on every n-th validation
        sentence, per unit of ``_eval_work`` (a sample's batches mix lengths and pad more than the whole split's).
        The sample is evaluated twice and the second is timed: a first evaluation pays one-off costs (kernels for
        each new shape, buffers) that made the estimate run long. Measured on BioNLP2004, AMX CPU, bf16: first
        pass 180 us per unit of work, the repeat 131-138, the whole validation split 106; on AVX2 (fp32) timing the
        first pass planned evaluations 1.6x longer than they took and a 5-minute budget ended at 4.39 min."""
        val = self.corpus.splits["validation"]
        picked = val[:: max(1, len(val) // sample)]
        evaluate(self.evaluator, picked, decodes=DECODINGS)  # warm-up, not timed
        started = time.perf_counter()
        evaluate(self.evaluator, picked, decodes=DECODINGS)
        return (time.perf_counter() - started) / max(1, self._eval_work(picked))

    def _eval_work(self, sentences) -> int:
        """The work of evaluating these sentences as the Tagger batches them: padded tokens of each forward pass,
        plus a pass's fixed cost (in tokens, as ``inference_batches`` counts it)."""
        if not sentences:
            return 0
        windows, _ = encode(self.tokenizer, [s.tokens for s in sentences], self.max_length)
        lengths = [len(w.input_ids) for w in windows]
        groups = inference_batches(lengths, self.cfg.train.eval_batch_size)
        return sum(PASS_TOKENS + len(g) * padded_length(max(lengths[i] for i in g)) for g in groups)


def _train(cfg: Config, out: Path, resume: bool, progress: bool, device, stop_after_steps, dist: Dist, started):
    """The recipe: set up; plan the schedule (or resume it); then for each epoch train, evaluate, keep the best
    and checkpoint; finally score the best adapter on test and write the run directory."""
    run = _Run(cfg, out, resume, progress, device, dist, started)
    with low_precision_weights(run.model, run.dtype, cfg.train.low_precision_weights):
        return _loop(run, resume, stop_after_steps)


def _loop(run: _Run, resume: bool, stop_after_steps: int | None) -> tuple[Path, Tagger]:
    cfg, dist, out = run.cfg, run.dist, run.out
    state, tallies, opt = _start_or_resume(run, resume)  # a --time-budget plan times steps as they will run
    mine = tallies[dist.rank]
    if dist.main:
        write_json(out / "config.json", {**cfg.to_dict(), "run": {**run.facts, "steps_per_epoch": state.steps}})
        run.labels.save(out / "labels.json")
    trainable, total = run.facts["trainable_params"], run.facts["all_params"]
    log.info("loratag train: %s on %s -> %s", cfg.model, cfg.data, out)
    log.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total, 100 * trainable / total)
    log.info("effective batch: %s (%d process(es)), %d steps", run.facts["effective_batch"], dist.world,
             sum(state.steps))  # fmt: skip

    while state.epoch < len(state.steps) and not state.stopped_early:
        _train_epoch(run, opt, state, mine, stop_after_steps)
        evaluation_started = time.monotonic()
        _evaluate_epoch(run, state, mine)
        if state.budget and state.epoch < len(state.steps) and not state.stopped_early:
            run.replan(state, mine.seconds, time.monotonic() - evaluation_started)
        mine = Tally()
        _checkpoint(run, opt, state, mine)
        if stop_after_steps is not None and state.global_step >= stop_after_steps:
            break
    return _finish(run, state)


def _start_or_resume(run: _Run, resume: bool) -> tuple[TrainState, list[Tally], _Optimizer]:
    path = run.out / CHECKPOINT
    saved = torch.load(path, weights_only=False) if resume and path.is_file() else None
    if saved is not None and "state" not in saved:
        raise ValueError(f"{path}: a checkpoint of an older loratag; start the run again (--overwrite)")
    if saved is None:
        if resume:
            log.info("no checkpoint yet; starting from the beginning")
        steps, budget = run.schedule()
        state = TrainState(steps=steps, budget=budget)
        tallies = [Tally() for _ in range(run.dist.world)]
    else:
        state = TrainState(**saved["state"])
        tallies = [Tally(**t) for t in saved["ranks"]]
        if len(tallies) != run.dist.world:
            raise ValueError(f"{path}: the checkpoint was written by {len(tallies)} process(es); resume with as many")
        run.started -= state.spent_seconds  # a time budget counts the wall time before the crash too
    opt = _Optimizer.build(run.model, run.cfg.train, state, run.device, run.dtype)
    if saved is not None:
        params = dict(run.trainable)
        with torch.no_grad():
            for n, v in saved["trainable"].items():
                params[n].copy_(v)
        opt.load_state_dict(saved["optimizer"])
        log.info("resumed at epoch %d, step %d", state.epoch + 1, state.step_in_epoch)
    return state, tallies, opt


def _train_epoch(run: _Run, opt: _Optimizer, state: TrainState, mine: Tally, stop_after_steps: int | None) -> None:
    """Optimizer steps from where the state stands to the end of its epoch (or the budget's deadline)."""
    t, dist, epoch = run.cfg.train, run.dist, state.epoch
    plan, divisors = run.plan(epoch), run.divisors(epoch)
    if mine.rng is not None:
        torch.set_rng_state(mine.rng)  # mid-epoch resume: dropout continues exactly where it stopped
    else:
        torch.manual_seed(t.seed * 1009 + epoch + 7919 * dist.rank)
    deadline = state.budget["deadline_s"] if state.budget else None
    every, last_save = t.checkpoint_minutes * 60, time.monotonic()
    run.model.train()
    started = time.monotonic() - mine.seconds
    bar = progress_bar(state.steps[epoch], f"epoch {epoch + 1}/{len(state.steps)}", "step", run.progress,
                       state.step_in_epoch)  # fmt: skip
    replan_every = state.budget.get("replan_every", 0) if state.budget else 0
    with run.upper_layers():
        b = state.step_in_epoch - 1
        while (b := b + 1) < state.steps[epoch]:  # a budgeted run may move the epoch's end as it goes
            loss, loss_sum, gold, inputs = run.loss(plan[b][dist.rank :: dist.world], divisors[b])
            opt.step(loss, run.model)
            n_labels = int((gold != IGNORE).sum())
            mine.tokens += int(inputs["attention_mask"].sum())
            mine.loss_sum += loss_sum.item()
            mine.labels += n_labels
            state.step_in_epoch, state.global_step = b + 1, state.global_step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum.item() / max(1, n_labels):.4f}", refresh=False)
            if stop_after_steps is not None and state.global_step >= stop_after_steps:
                break
            if deadline is not None and dist.any(run.elapsed() > deadline):
                log.info("time budget: stopping at step %d of epoch %d (the deadline)", b + 1, epoch + 1)
                state.stopped_early = True
                break
            if replan_every and state.global_step % replan_every == 0 and b + 1 < state.steps[epoch]:
                run.replan(state, time.monotonic() - started)
                bar.total = state.steps[epoch]
                bar.refresh()
            due = bool(every) and time.monotonic() - last_save >= every and b + 1 < state.steps[epoch]
            if dist.any(due):
                mine.seconds = time.monotonic() - started
                _checkpoint(run, opt, state, mine)
                last_save = time.monotonic()
    bar.close()
    mine.seconds = time.monotonic() - started


def _evaluate_epoch(run: _Run, state: TrainState, mine: Tally) -> None:
    """Score validation, keep the adapter if it is the best so far, and move the state to the next epoch."""
    parts = run.dist.gather({k: getattr(mine, k) for k in ("loss_sum", "labels", "tokens", "seconds")})
    loss_sum, n_labels, tokens = (sum(p[k] for p in parts) for k in ("loss_sum", "labels", "tokens"))
    seconds = max(p["seconds"] for p in parts)
    started = time.monotonic()
    val = run.validate()
    entry = {
        "epoch": state.epoch + 1,
        "steps": state.step_in_epoch,
        "train_loss": loss_sum / max(1, n_labels),
        "train_seconds": seconds,
        "train_tokens": tokens,
        "train_tokens_per_second": tokens / seconds if seconds else None,
        "validation": val,
        "validation_seconds": round(time.monotonic() - started, 1),
        "wall_seconds": round(run.elapsed(), 1),  # since the run began, evaluations included (for the curves)
    }
    improved = val["f1"] > state.best_f1
    if improved:
        state.best_f1, state.best_epoch = val["f1"], state.epoch + 1
    if run.dist.main:
        if improved:
            save_adapter(run.model, run.out / "adapter")
        save_adapter(run.model, run.out / "last")
    state.history.append(entry)
    log.info(
        "epoch %d/%d  loss %.4f  val P %.4f R %.4f F1 %.4f (%s)  %.0f s  %.0f tok/s%s",
        state.epoch + 1, len(state.steps), entry["train_loss"], val["precision"], val["recall"], val["f1"],
        val["decode"], seconds, entry["train_tokens_per_second"] or 0, "  (best)" if improved else "",
    )  # fmt: skip
    state.epoch, state.step_in_epoch = state.epoch + 1, 0


def _checkpoint(run: _Run, opt: _Optimizer, state: TrainState, mine: Tally) -> None:
    ranks = run.dist.gather({**asdict(mine), "rng": torch.get_rng_state()})
    state.spent_seconds = run.elapsed()
    if run.dist.main:
        payload = {"state": asdict(state), "trainable": _trainable_state(run.trainable), "ranks": ranks}
        _save_checkpoint(run.out, {**payload, "optimizer": opt.state_dict()})


def _finish(run: _Run, state: TrainState) -> tuple[Path, Tagger]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    out, dist = run.out, run.dist
    dist.barrier()  # rank 0 has written adapter/
    set_peft_model_state_dict(run.model, load_file(out / "adapter" / "adapter_model.safetensors"))
    metrics = {
        "mode": state.history[-1]["validation"]["mode"],
        "decode": run.cfg.train.decode,
        "epochs": state.history,
        "best_epoch": state.best_epoch,
        "best_validation_f1": state.best_f1,
    }
    if state.budget:
        metrics["time_budget"] = {**state.budget, "stopped_early": state.stopped_early}
    if "test" in run.corpus.splits:
        started = time.monotonic()
        metrics["test"] = evaluate(run.evaluator, run.corpus.splits["test"], dist=dist, decodes=DECODINGS)
        metrics["test_seconds"] = round(time.monotonic() - started, 1)
        test = metrics["test"]
        log.info(
            "test (best epoch %d): P %.4f R %.4f F1 %.4f (%s)",
            state.best_epoch, test["precision"], test["recall"], test["f1"], test["decode"],
        )  # fmt: skip
    metrics["wall_seconds"] = round(run.elapsed(), 1)
    if dist.main:
        write_json(out / "metrics.json", metrics)
        write_card(out, run.cfg, run.labels, metrics, read_json(out / "config.json").get("run", {}))
        (out / CHECKPOINT).unlink(missing_ok=True)
    dist.barrier()
    run.model.eval()  # the returned Tagger predicts; dropout stays off
    return out, run.evaluator
