"""``--head-init labels``: the classifier head starts as the classifier the base's own features already support, not
at random, so the first steps train the adapter instead of finding the labels.

Each label's mean feature (what the head reads: the encoder's output at a word's first sub-token, LoRA still zero)
over a sample of training windows, and one shared variance, give linear discriminant analysis's classifier
(W_c = mu_c / s2, b_c = -|mu_c|^2 / 2 s2 + log prior_c); its logits are then scaled by the one temperature that
fits the sample best, as a Gaussian model over 384 dimensions is over-confident. Written here: a few lines of
statistics on features only a forward hook sees; no library initialises a PEFT head from data."""

from __future__ import annotations

import logging
import random

import torch

from ..encoding import IGNORE
from ..precision import autocast

log = logging.getLogger("loratag")
SAMPLE = 256  # windows: ~1-2 s of forward passes on a 2-core CPU for MiniLM; enough for 11 label means
TEMPERATURES = [2.0**e for e in range(-8, 5)]


def head_linear(model) -> torch.nn.Linear:
    """The head's trainable Linear (PEFT keeps the base's head apart and trains a copy in ``modules_to_save``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "classifier", None)
    head = getattr(base, "score", None) if head is None else head
    head = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"--head-init labels needs a Linear classifier head; {type(base).__name__} has {head!r}")
    return head


def features(s, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input and the gold label at every labelled position of these windows, in eval mode."""
    head, seen = head_linear(s.model), []
    hook = head.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().float()))
    was_training, xs, ys = s.model.training, [], []
    s.model.eval()
    try:
        with torch.no_grad(), autocast(s.device, s.dtype), s.upper_layers():
            for i in range(0, len(rows), s.cfg.train.eval_batch_size):
                inputs, gold = s.feed(rows[i : i + s.cfg.train.eval_batch_size])
                s.model(**inputs)
                keep = gold != IGNORE
                xs.append(seen.pop()[keep].cpu())
                ys.append(gold[keep].cpu())
    finally:
        hook.remove()
        s.model.train(was_training)
    return torch.cat(xs), torch.cat(ys)


def discriminant(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LDA with a shared isotropic variance, then the temperature with the lowest cross-entropy on ``(x, y)``:
    ``(weight (k, d), bias (k,), temperature)``. A label absent from the sample gets the overall mean and a prior
    of one count (add-one), so it starts unlikely, not impossible."""
    counts = torch.bincount(y, minlength=k).float()
    sums = torch.zeros(k, x.shape[1]).index_add_(0, y, x)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], x.mean(0))
    var = ((x - means[y]) ** 2).mean().clamp(min=1e-6)
    weight = means / var
    bias = -(means**2).sum(1) / (2 * var) + torch.log((counts + 1) / (counts.sum() + k))
    weight, bias = weight - weight.mean(0), bias - bias.mean()  # the same logits up to a shift; smaller numbers
    logits = x @ weight.T + bias
    losses = [torch.nn.functional.cross_entropy(logits * t, y).item() for t in TEMPERATURES]
    best = TEMPERATURES[min(range(len(losses)), key=losses.__getitem__)]
    return weight * best, bias * best, best


def init_head(s, seed: int) -> dict:
    """Set the head from a sample of the training windows (the same on every process: the same rows, so the same
    numbers); returns what the log and config.json record."""
    rows = sorted(random.Random(seed).sample(range(len(s.windows)), min(SAMPLE, len(s.windows))))
    x, y = features(s, rows)
    k = len(s.labels)
    weight, bias, temperature = discriminant(x, y, k)
    head = head_linear(s.model)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    accuracy = ((x @ weight.T + bias).argmax(1) == y).float().mean().item()
    facts = {"windows": len(rows), "words": len(y), "temperature": temperature, "sample_accuracy": round(accuracy, 4)}
    log.info(
        "--head-init labels: head set from the base's features of %d words (%d windows); sample accuracy %.3f",
        len(y), len(rows), accuracy,
    )  # fmt: skip
    return facts
