"""A training session's fixed parts: the data and its windows, the model, the evaluator, and how a batch of windows
becomes a loss (token ids, or the cached hidden states below the adapted layers)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import DECODINGS, Config
from ..corpus import load as load_corpus
from ..crf import CRF, auto_crf, crf_loss
from ..crf import MODULE as CRF_MODULE
from ..encoding import IGNORE, batches, collate, document_contexts, encode, padded_length
from ..evaluation import evaluate
from ..labels import TRANSITIONS, LabelSet, Transitions
from ..modeling import (
    auto_case,
    build_model,
    count_parameters,
    encoder_layers,
    load_tokenizer,
    model_max_length,
    resolve_model,
)
from ..precision import autocast, precision_name, resolve_precision
from ..rundir import LABELS
from ..tagger import Tagger
from .dist import Dist
from .frozen import LayerCache, layers_only

log = logging.getLogger("loratag")


def epoch_plan(lengths: list[int], cfg: Config, epoch: int, world: int) -> list[list[int]]:
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


def loss_divisors(plan: list[list[int]], windows, per_epoch: bool) -> list[float]:
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
    divided by ``divisor`` (see ``loss_divisors``) and multiplied by ``world`` because DDP averages gradients
    over processes. A batch with no labelled token (windows that own no words) gives a zero loss, not a
    division by zero."""
    loss_sum = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), gold.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum * (world / max(1, divisor)), loss_sum


class Session:
    """Built once per process at the start of a run (or a resume) and not changed after: everything the loop and
    the budget's probes read."""

    def __init__(self, cfg: Config, out: Path, resume: bool, progress: bool, device: torch.device, dist: Dist):
        t = cfg.train
        self.cfg, self.out, self.progress, self.device, self.dist = cfg, out, progress, device, dist
        self.setup: dict[str, float] = {}  # seconds of each part of the set-up (a short --time-budget's overhead)
        phase = time.monotonic()
        torch.manual_seed(t.seed)
        self.corpus = load_corpus(cfg.data, cfg.corpus, t.seed)
        self.setup["data"], phase = time.monotonic() - phase, time.monotonic()
        self.labels: LabelSet = self.corpus.labels
        if resume and (out / LABELS).is_file():
            self.labels = LabelSet.load(out / LABELS)
        train_set = self.corpus.splits["train"][: t.max_train_sentences]
        self.tokenizer = load_tokenizer(resolve_model(cfg.model))
        if t.case is None or t.crf is None:  # auto: resolved here, so config.json records what the run did
            case = self._auto_case(cfg) if t.case is None else t.case
            self.cfg = cfg = replace(cfg, train=replace(t, case=case, crf=auto_crf(t)))
            t = cfg.train
        self.model = build_model(cfg, self.labels).to(device)
        self.crf = CRF(self.labels.labels).to(device) if t.crf else None
        if self.crf is not None:  # on the model, so that the optimizer, DDP, gradient clipping, checkpoints see it
            self.model.get_base_model().add_module(CRF_MODULE, self.crf)
        self.setup["model"], phase = time.monotonic() - phase, time.monotonic()
        # by their names in the whole model: a checkpoint inside an epoch is written while the cached layers are cut
        # out of it, when named_parameters() would number the remaining layers from 0
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.max_length = min(t.max_length or 10**9, model_max_length(self.tokenizer, self.model.config))
        words = [s.tokens for s in train_set]
        contexts = document_contexts(words, [s.doc for s in train_set], t.context)
        windows, windowed = encode(self.tokenizer, words, self.max_length, progress, contexts, t.context, t.case)
        self.windows = [w for w in windows if w.last > w.first]  # a window that owns no word has nothing to learn
        self.setup["tokenize"] = time.monotonic() - phase
        self.context = self._context_report(train_set, windows) if t.context else None
        self.label_ids = [[self.labels.label2id[x] for x in s.tags] for s in train_set]
        self.lengths = [len(w.input_ids) for w in self.windows]
        self.dtype = resolve_precision(t.precision, device)
        self.pad = self.tokenizer.pad_token_id or 0
        self._plans: dict[int, list[list[int]]] = {}
        self.cache, self.below = self._cache_lower_layers()
        self.evaluator = Tagger(
            self.model, self.tokenizer, self.labels, self.max_length, t.precision, t.eval_batch_size, device, t.decode,
            t.context, t.case,
        )  # fmt: skip
        self.forward = self._data_parallel() if dist.active else self.model
        self.facts = self._facts(len(train_set), windowed)

    def _auto_case(self, cfg: Config) -> bool:
        from transformers import AutoConfig

        mconf = AutoConfig.from_pretrained(resolve_model(cfg.model))
        case, why = auto_case(self.tokenizer, mconf, cfg.lora.top_layers)
        log.info("--case auto: %s (%s)", "on" if case else "off", why)
        return case

    def _cache_lower_layers(self) -> tuple[LayerCache | None, int]:
        """With --lora-top-layers, the frozen layers below run once here: their output for every window."""
        lora = self.cfg.lora
        if lora.top_layers is None:
            return None, 0
        n = len(encoder_layers(self.model)[1])
        below = n - lora.adapted_layers(n)
        started = time.monotonic()
        cache = LayerCache.build(
            self.model, self.windows, below, self.pad, self.dtype, self.device, self.cfg.train.eval_batch_size,
            self.progress,
        )  # fmt: skip
        log.info(
            "cached layers 1-%d for %d windows: %.0f MiB %s in %.0f s", below, len(self.windows),
            cache.nbytes / 2**20, precision_name(self.dtype), time.monotonic() - started,
        )  # fmt: skip
        return cache, below

    def _data_parallel(self):
        from torch.nn.parallel import DistributedDataParallel

        # DDP buckets only parameters that require gradients (the LoRA weights and the head): the frozen base is
        # never all-reduced, and every trainable parameter is used in every step (no unused-parameter scan).
        return DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=False,
            gradient_as_bucket_view=True,
            # the model's buffers (position ids) are constants, the same on every rank; and while the cached layers
            # are cut out of the model, so are the embeddings' buffers DDP would broadcast
            broadcast_buffers=False,
        )

    def _context_report(self, train_set, windows) -> dict:
        """How many training sentences --context gave a document context, and how many sub-tokens it added: where
        the data marks no documents, every sentence is read alone, and the log says so."""
        specials = self.tokenizer.num_special_tokens_to_add()
        read = sum(len(w.input_ids) for w in windows)
        added = sum(sum(1 for x in w.word_ids if x is None) - specials for w in windows)
        alone = read - added
        with_doc = sum(1 for s in train_set if s.doc is not None)
        report = {"sentences_in_documents": with_doc, "subword_tokens_added_per_epoch": added,
                  "tokens_per_epoch_ratio": round(read / max(1, alone), 2)}  # fmt: skip
        if not with_doc:
            log.warning(
                "--context %d: the training data marks no documents (documents.tsv, -DOCSTART-, or documents read "
                "whole), so every sentence is read alone", self.cfg.train.context,
            )  # fmt: skip
        else:
            log.info(
                "--context %d: %d of %d training sentences lie in documents; %.2fx the sub-tokens of sentences alone",
                self.cfg.train.context, with_doc, len(train_set), report["tokens_per_epoch_ratio"],
            )  # fmt: skip
        return report

    def _facts(self, sentences: int, windowed: int) -> dict:
        """What config.json records under "run": facts about this run that are not settings."""
        t, dist = self.cfg.train, self.dist
        trainable, total = count_parameters(self.model)
        per_process = f"<= {t.batch_tokens} tokens" if t.batch_tokens else t.batch_size
        return {
            "data": self.corpus.report,
            "device": str(self.device),
            "autocast": precision_name(self.dtype),
            "max_length": self.max_length,
            "train_sentences": sentences,
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
            **({"context": self.context} if self.context else {}),
        }

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans[epoch] = epoch_plan(self.lengths, self.cfg, epoch, self.dist.world)
        return self._plans[epoch]

    def divisors(self, epoch: int) -> list[float]:
        return loss_divisors(self.plan(epoch), self.windows, self.cfg.train.length_grouping)

    def padded(self, rows: list[int]) -> int:
        """Padded sub-word tokens of this process's share of a global batch (rows x longest, as collate pads)."""
        mine = rows[self.dist.rank :: self.dist.world] or rows[:1]
        return len(mine) * padded_length(max(self.lengths[i] for i in mine))

    def step_tokens(self, epoch: int) -> list[int]:
        """Padded tokens of each step of an epoch, this process's share: the budget planner's unit of work."""
        return [self.padded(b) for b in self.plan(epoch)]

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
        if self.crf is not None:
            t = self.cfg.train
            loss, loss_sum = crf_loss(self.crf, logits, gold, divisor, self.dist.world, IGNORE, t.crf_token_loss)
        else:
            loss, loss_sum = token_loss(logits, gold, divisor, self.dist.world)
        return loss, loss_sum, gold, inputs

    def learned(self) -> dict:
        """What is saved beside the adapter: the CRF scores validation just decoded with (``transitions.json``)."""
        scores = self.evaluator.labels.transitions
        return {} if scores is None else {TRANSITIONS: scores.to_dict(self.labels.labels)}

    def keep_learned(self, adapter: Path) -> None:
        """The kept epoch's CRF scores back into the CRF and the evaluator (its adapter weights are loaded already)."""
        if self.crf is None:
            return
        kept = Transitions.read(adapter, self.labels.labels)
        self.crf.load(kept)
        self.evaluator.labels = replace(self.labels, transitions=kept)

    def validate(self) -> dict:
        if self.crf is not None:  # the evaluator decodes with the scores as they are now
            self.evaluator.labels = replace(self.labels, transitions=self.crf.export())
        return evaluate(self.evaluator, self.corpus.splits["validation"], self.progress, self.dist, DECODINGS)
