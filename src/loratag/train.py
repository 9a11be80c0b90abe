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
from tqdm.auto import tqdm

from .card import write_card
from .config import Config
from .data import load_corpus
from .encoding import batches, collate, encode
from .evaluation import evaluate
from .inference import Tagger
from .labels import LabelSet
from .modeling import (
    autocast,
    build_model,
    count_parameters,
    device_of,
    load_tokenizer,
    model_max_length,
    resolve_model,
    resolve_precision,
)
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


def _epoch_plan(lengths: list[int], cfg: Config, epoch: int) -> list[list[int]]:
    t = cfg.train
    return batches(lengths, t.batch_size, t.batch_tokens, seed=t.seed * 1009 + epoch, group=t.length_grouping)


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
    """
    out = Path(out)
    _prepare_dir(out, resume, overwrite)
    if resume:
        recover(out)
        cfg = Config.load(out / "config.json")
    handler = _attach_log(out)
    try:
        return _train(cfg, out, resume, progress, device_of(device), stop_after_steps)
    finally:
        logging.getLogger("loratag").removeHandler(handler)
        handler.close()


def _train(cfg: Config, out: Path, resume: bool, progress: bool, device, stop_after_steps) -> tuple[Path, Tagger]:
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
    label_ids = [[labels.label2id[x] for x in s.tags] for s in train_set]
    lengths = [len(w.input_ids) for w in windows]
    dtype = resolve_precision(t.precision, device)
    trainable, total = count_parameters(model)
    plans = [_epoch_plan(lengths, cfg, e) for e in range(t.epochs)]
    total_steps = sum(len(p) for p in plans)
    run_facts = {
        "device": str(device),
        "autocast": str(dtype).replace("torch.", "") if dtype else "fp32",
        "max_length": max_length,
        "train_sentences": len(train_set),
        "train_windows": len(windows),
        "train_sentences_windowed": windowed,
        "train_subword_tokens_per_epoch": sum(lengths),
        "steps_per_epoch": [len(p) for p in plans],
        "effective_batch": t.batch_tokens and f"<= {t.batch_tokens} tokens" or t.batch_size,
        "trainable_params": trainable,
        "all_params": total,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "config.json", {**cfg.to_dict(), "run": run_facts})
    labels.save(out / "labels.json")
    log.info("loratag train: %s on %s -> %s", cfg.model, cfg.data, out)
    log.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total, 100 * trainable / total)
    log.info("%d training sentences, %d needed windows (max_length %d)", len(train_set), windowed, max_length)

    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(t.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
    evaluator = Tagger(model, tokenizer, labels, max_length, t.precision, t.eval_batch_size, device)

    state = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "history": [],
        "best_f1": -1.0,
        "best_epoch": None,
        "epoch_loss_sum": 0.0,
        "epoch_tokens": 0,
        "epoch_seconds": 0.0,
    }
    rng_state = None
    if resume and (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, weights_only=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in state.pop("trainable").items():
                params[n].copy_(v)
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        scaler.load_state_dict(state.pop("scaler"))
        rng_state = state.pop("rng")
        log.info("resumed at epoch %d, step %d", state["epoch"] + 1, state["step_in_epoch"])
    elif resume:
        log.info("no checkpoint yet; starting from the beginning")

    def checkpoint() -> None:
        _save_checkpoint(
            out,
            {
                **state,
                "trainable": _trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(),
            },
        )

    every = t.checkpoint_minutes * 60
    last_save = time.monotonic()
    for epoch in range(state["epoch"], t.epochs):
        plan = plans[epoch]
        if rng_state is not None:
            torch.set_rng_state(rng_state)  # mid-epoch resume: dropout continues exactly where it stopped
            rng_state = None
        else:
            torch.manual_seed(t.seed * 1009 + epoch)
        model.train()
        started = time.monotonic() - state["epoch_seconds"]
        bar = tqdm(
            total=len(plan),
            initial=state["step_in_epoch"],
            desc=f"epoch {epoch + 1}/{t.epochs}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        for b in range(state["step_in_epoch"], len(plan)):
            batch = {
                k: v.to(device)
                for k, v in collate([windows[i] for i in plan[b]], tokenizer.pad_token_id or 0, label_ids).items()
            }
            with autocast(device, dtype):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's default, as in the guide
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["epoch_tokens"] += int(batch["attention_mask"].sum())
            state["epoch_loss_sum"] += loss.item()
            state["step_in_epoch"], state["global_step"] = b + 1, state["global_step"] + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
                break
            if every and time.monotonic() - last_save >= every and b + 1 < len(plan):
                state["epoch_seconds"] = time.monotonic() - started
                checkpoint()
                last_save = time.monotonic()
        bar.close()
        seconds = time.monotonic() - started
        steps_run = max(1, state["step_in_epoch"])
        val = evaluate(evaluator, corpus.splits["validation"], progress=progress)
        entry = {
            "epoch": epoch + 1,
            "train_loss": state["epoch_loss_sum"] / steps_run,
            "train_seconds": seconds,
            "train_tokens": state["epoch_tokens"],
            "train_tokens_per_second": state["epoch_tokens"] / seconds if seconds else None,
            "validation": val,
        }
        improved = val["f1"] > state["best_f1"]
        if improved:
            state["best_f1"], state["best_epoch"] = val["f1"], epoch + 1
            save_adapter(model, out / "adapter")
        save_adapter(model, out / "last")
        state["history"].append(entry)
        state.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_tokens=0, epoch_seconds=0.0)
        checkpoint()
        last_save = time.monotonic()
        log.info(
            "epoch %d/%d  loss %.4f  val P %.4f R %.4f F1 %.4f  %.0f s  %.0f tok/s%s",
            epoch + 1,
            t.epochs,
            entry["train_loss"],
            val["precision"],
            val["recall"],
            val["f1"],
            seconds,
            entry["train_tokens_per_second"] or 0,
            "  (best)" if improved else "",
        )
        if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
            break

    return _finish(cfg, out, model, evaluator, corpus, state, labels)


def _finish(cfg, out: Path, model, evaluator, corpus, state, labels) -> tuple[Path, Tagger]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(out / "adapter" / "adapter_model.safetensors"))
    metrics = {
        "mode": state["history"][-1]["validation"]["mode"],
        "epochs": state["history"],
        "best_epoch": state["best_epoch"],
        "best_validation_f1": state["best_f1"],
    }
    if "test" in corpus.splits:
        metrics["test"] = evaluate(evaluator, corpus.splits["test"])
        log.info(
            "test (best epoch %d): P %.4f R %.4f F1 %.4f",
            state["best_epoch"],
            metrics["test"]["precision"],
            metrics["test"]["recall"],
            metrics["test"]["f1"],
        )
    write_json(out / "metrics.json", metrics)
    write_card(out, cfg, labels, metrics, read_json(out / "config.json").get("run", {}))
    (out / CHECKPOINT).unlink(missing_ok=True)
    return out, evaluator
