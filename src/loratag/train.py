"""Training: a plain loop that evaluates every epoch, keeps the best adapter, and resumes after a crash.

The run directory is the contract (see README): config.json, labels.json, adapter/ (best by validation F1),
last/ (the last epoch's adapter), metrics.json, README.md (model card) and train.log.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from .card import write_card
from .config import Config
from .data import load_corpus
from .dist import Dist
from .encoding import IGNORE, batches, collate, encode
from .evaluation import evaluate
from .inference import Tagger
from .labels import LabelSet
from .modeling import (
    autocast,
    build_model,
    count_parameters,
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


def _param_groups(model, weight_decay: float) -> list[dict]:
    # As transformers' Trainer (which the guide uses): no weight decay on biases and LayerNorm weights.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(out: Path, state: dict) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
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
) -> tuple[Path, Tagger]:
    """Train, write the run directory, and return it with the in-memory Tagger (best adapter loaded).

    ``resume``: continue from the last checkpoint in ``out`` with the settings saved there.
    ``stop_after_steps``: end early after that many optimizer steps in total (quick checks, tests).
    Under torchrun / accelerate launch each process trains on its shard; only rank 0 writes.
    """
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
        return _train(cfg, out, resume, progress and dist.main, dist.device(device), stop_after_steps, dist)
    finally:
        if handler is not None:
            logging.getLogger("loratag").removeHandler(handler)
            handler.close()
        dist.close()


def _global_label_counts(plan: list[list[int]], windows) -> list[int]:
    """Labelled sub-tokens (first sub-tokens of owned words) in each global batch: the loss divisor that makes
    N processes compute the same gradient as one process with the same global batch."""
    counts = [w.last - w.first for w in windows]
    return [sum(counts[i] for i in b) for b in plan]


def token_loss(logits: torch.Tensor, gold: torch.Tensor, divisor: int, world: int = 1):
    """``(loss to backpropagate, summed loss)``: the cross-entropy summed over this process's labelled tokens,
    divided by the labelled tokens of the whole global batch (``divisor``) and multiplied by ``world`` because
    DDP averages gradients over processes: the gradient one process would compute on the global batch. A batch
    with no labelled token (windows that own no words) gives a zero loss, not a division by zero."""
    loss_sum = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), gold.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum * (world / max(1, divisor)), loss_sum


def _train(cfg: Config, out: Path, resume: bool, progress: bool, device, stop_after_steps, dist: Dist):
    t = cfg.train
    torch.manual_seed(t.seed)
    corpus = load_corpus(cfg.data)
    labels: LabelSet = corpus.labels
    if resume and (out / "labels.json").is_file():
        labels = LabelSet.load(out / "labels.json")
    train_set = corpus.splits["train"][: t.max_train_sentences]
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    model = build_model(cfg, labels).to(device)
    max_length = min(t.max_length or 10**9, model_max_length(tokenizer, model.config))
    windows, windowed = encode(tokenizer, [s.tokens for s in train_set], max_length, progress=progress)
    windows = [w for w in windows if w.last > w.first]  # a window that owns no word has nothing to learn from
    label_ids = [[labels.label2id[x] for x in s.tags] for s in train_set]
    lengths = [len(w.input_ids) for w in windows]
    dtype = resolve_precision(t.precision, device)
    trainable, total = count_parameters(model)
    plans = [_epoch_plan(lengths, cfg, e, dist.world) for e in range(t.epochs)]
    divisors = [_global_label_counts(p, windows) for p in plans]
    total_steps = sum(len(p) for p in plans)
    per_process = f"<= {t.batch_tokens} tokens" if t.batch_tokens else t.batch_size
    run_facts = {
        "device": str(device),
        "autocast": precision_name(dtype),
        "max_length": max_length,
        "train_sentences": len(train_set),
        "train_windows": len(windows),
        "train_sentences_windowed": windowed,
        "train_subword_tokens_per_epoch": sum(lengths),
        "steps_per_epoch": [len(p) for p in plans],
        "processes": dist.world,
        "batch_per_process": per_process,
        "effective_batch": f"{dist.world} x {per_process}" if dist.active else per_process,
        "trainable_params": trainable,
        "all_params": total,
        "torch_threads": torch.get_num_threads(),
    }
    if dist.main:
        write_json(out / "config.json", {**cfg.to_dict(), "run": run_facts})
        labels.save(out / "labels.json")
    log.info("loratag train: %s on %s -> %s", cfg.model, cfg.data, out)
    log.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total, 100 * trainable / total)
    log.info("%d training sentences, %d needed windows (max_length %d)", len(train_set), windowed, max_length)
    log.info("effective batch: %s (%d process(es)), %d steps", run_facts["effective_batch"], dist.world, total_steps)

    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(t.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
    evaluator = Tagger(model, tokenizer, labels, max_length, t.precision, t.eval_batch_size, device)
    forward = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        # DDP buckets only parameters that require gradients (the LoRA weights and the head): the frozen base
        # is never all-reduced, and every trainable parameter is used in every step (no unused-parameter scan).
        forward = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
            gradient_as_bucket_view=True,
        )

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best_f1": -1.0, "best_epoch": None}
    mine = {"loss_sum": 0.0, "labels": 0, "tokens": 0, "seconds": 0.0, "rng": None}  # this process's part
    if resume and (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, weights_only=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in state.pop("trainable").items():
                params[n].copy_(v)
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        scaler.load_state_dict(state.pop("scaler"))
        ranks = state.pop("ranks")
        if len(ranks) != dist.world:
            raise ValueError(f"{out}: the checkpoint was written by {len(ranks)} process(es); resume with as many")
        mine = ranks[dist.rank]
        log.info("resumed at epoch %d, step %d", state["epoch"] + 1, state["step_in_epoch"])
    elif resume:
        log.info("no checkpoint yet; starting from the beginning")

    def checkpoint() -> None:
        ranks = dist.gather({**mine, "rng": torch.get_rng_state()})
        if dist.main:
            payload = {
                **state,
                "trainable": _trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ranks": ranks,
            }
            _save_checkpoint(out, payload)

    every = t.checkpoint_minutes * 60
    last_save = time.monotonic()
    pad = tokenizer.pad_token_id or 0
    for epoch in range(state["epoch"], t.epochs):
        plan = plans[epoch]
        if mine["rng"] is not None:
            torch.set_rng_state(mine["rng"])  # mid-epoch resume: dropout continues exactly where it stopped
        else:
            torch.manual_seed(t.seed * 1009 + epoch + 7919 * dist.rank)
        model.train()
        started = time.monotonic() - mine["seconds"]
        bar = progress_bar(len(plan), f"epoch {epoch + 1}/{t.epochs}", "step", progress, state["step_in_epoch"])
        for b in range(state["step_in_epoch"], len(plan)):
            rows = plan[b][dist.rank :: dist.world]
            batch = {k: v.to(device) for k, v in collate([windows[i] for i in rows], pad, label_ids).items()}
            gold = batch.pop("labels")
            with autocast(device, dtype):
                logits = forward(**batch).logits
            loss, loss_sum = token_loss(logits, gold, divisors[epoch][b], dist.world)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's default, as in the guide
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mine["tokens"] += int(batch["attention_mask"].sum())
            mine["loss_sum"] += loss_sum.item()
            mine["labels"] += int((gold != IGNORE).sum())
            state["step_in_epoch"], state["global_step"] = b + 1, state["global_step"] + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum.item() / max(1, int((gold != IGNORE).sum())):.4f}", refresh=False)
            if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
                break
            due = bool(every) and time.monotonic() - last_save >= every and b + 1 < len(plan)
            if dist.any(due):
                mine["seconds"] = time.monotonic() - started
                checkpoint()
                last_save = time.monotonic()
        bar.close()
        seconds = time.monotonic() - started
        parts = dist.gather({k: mine[k] for k in ("loss_sum", "labels", "tokens")})
        loss_sum, n_labels, tokens = (sum(p[k] for p in parts) for k in ("loss_sum", "labels", "tokens"))
        val = evaluate(evaluator, corpus.splits["validation"], progress=progress, dist=dist)
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, n_labels),
            "train_seconds": seconds,
            "train_tokens": tokens,
            "train_tokens_per_second": tokens / seconds if seconds else None,
            "validation": val,
        }
        improved = val["f1"] > state["best_f1"]
        if improved:
            state["best_f1"], state["best_epoch"] = val["f1"], epoch + 1
        if dist.main:
            if improved:
                save_adapter(model, out / "adapter")
            save_adapter(model, out / "last")
        state["history"].append(entry)
        state.update(epoch=epoch + 1, step_in_epoch=0)
        mine.update(loss_sum=0.0, labels=0, tokens=0, seconds=0.0, rng=None)
        checkpoint()
        last_save = time.monotonic()
        log.info(
            "epoch %d/%d  loss %.4f  val P %.4f R %.4f F1 %.4f  %.0f s  %.0f tok/s%s",
            epoch + 1, t.epochs, entry["train_loss"], val["precision"], val["recall"], val["f1"], seconds,
            entry["train_tokens_per_second"] or 0, "  (best)" if improved else "",
        )  # fmt: skip
        if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
            break

    return _finish(cfg, out, model, evaluator, corpus, state, labels, dist)


def _finish(cfg, out: Path, model, evaluator, corpus, state, labels, dist: Dist) -> tuple[Path, Tagger]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    dist.barrier()  # rank 0 has written adapter/
    set_peft_model_state_dict(model, load_file(out / "adapter" / "adapter_model.safetensors"))
    metrics = {
        "mode": state["history"][-1]["validation"]["mode"],
        "epochs": state["history"],
        "best_epoch": state["best_epoch"],
        "best_validation_f1": state["best_f1"],
    }
    if "test" in corpus.splits:
        metrics["test"] = evaluate(evaluator, corpus.splits["test"], dist=dist)
        log.info(
            "test (best epoch %d): P %.4f R %.4f F1 %.4f",
            state["best_epoch"], metrics["test"]["precision"], metrics["test"]["recall"], metrics["test"]["f1"],
        )  # fmt: skip
    if dist.main:
        write_json(out / "metrics.json", metrics)
        write_card(out, cfg, labels, metrics, read_json(out / "config.json").get("run", {}))
        (out / CHECKPOINT).unlink(missing_ok=True)
    dist.barrier()
    model.eval()  # the returned Tagger predicts; dropout stays off
    return out, evaluator
