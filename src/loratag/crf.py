"""``--crf``: a linear-chain CRF over the words' logits, trained with the adapter at its own learning rate.

Written by hand (~60 lines): pytorch-crf and torchcrf are unmaintained and neither knows IOB2's rule, which the
partition function here leaves out (Lester et al. 2020: a CRF trained on the paths the decoder may choose), and the
decoder is loratag's own Viterbi (``labels.viterbi_many``), so only the training half is needed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .labels import Transitions, may_follow

MODULE = "loratag_crf"  # the CRF's name on the model while it trains (the optimizer gives it --crf-lr)
NOTE = (
    "trained with --crf: loratag decodes each sentence with the CRF's transition scores (transitions.json, or "
    "loratag_crf here); a transformers pipeline or a bare PEFT forward pass takes each word's argmax without them"
)
FORBIDDEN = -1e4  # a transition IOB2 forbids; finite, so that a sum over nothing stays a number


def auto_crf(t) -> bool:
    """``--crf`` as given, or for auto: on where decoding is constrained (the default), the decoding that reads it.
    Its validation F1 in the study: higher on every corpus tried (docs/study.md)."""
    if t.crf is not None:
        return t.crf
    on = t.decode == "constrained"
    logging.getLogger("loratag").info("--crf auto: %s (--decode %s)", "on" if on else "off", t.decode)
    return on


class CRF(torch.nn.Module):
    """Transition, start and end scores, zero at first: the untrained CRF decodes as constrained decoding does."""

    def __init__(self, labels: Sequence[str]):
        super().__init__()
        k = len(labels)
        self.transitions = torch.nn.Parameter(torch.zeros(k, k))
        self.start = torch.nn.Parameter(torch.zeros(k))
        self.end = torch.nn.Parameter(torch.zeros(k))
        allowed, _ = may_follow(labels)
        # only transitions: a window of a sentence too long for the model may open on an I- word, so the learned
        # start scores, not a rule, say what opens a sentence
        self.register_buffer("rule", torch.tensor([[0.0 if ok else FORBIDDEN for ok in r] for r in allowed]), False)

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The summed negative log-likelihood of ``tags`` (N, W) given ``emissions`` (N, W, K) float32, ``mask``
        (N, W) True on each row's first ``length`` words (every row has at least one)."""
        n, w, _ = emissions.shape
        rows = torch.arange(n, device=emissions.device)
        lengths = mask.sum(1)
        trans = self.transitions + self.rule
        # the gold path's score: learned transitions only (a gold sequence IOB2 forbids is rare, repaired on
        # reading, and must not cost 1e4)
        gold = self.start[tags[:, 0]] + emissions[rows, 0, tags[:, 0]]
        alpha = self.start + emissions[:, 0]  # (N, K): log-sum of the scores of paths ending in each label
        for t in range(1, w):
            on = mask[:, t]
            step = emissions[rows, t, tags[:, t]] + self.transitions[tags[:, t - 1], tags[:, t]]
            gold = gold + torch.where(on, step, torch.zeros_like(step))
            nxt = torch.logsumexp(alpha[:, :, None] + trans, 1) + emissions[:, t]
            alpha = torch.where(on[:, None], nxt, alpha)
        gold = gold + self.end[tags[rows, lengths - 1]]
        return (torch.logsumexp(alpha + self.end, 1) - gold).sum()

    def load(self, kept: Transitions) -> None:
        with torch.no_grad():
            for p, value in zip((self.transitions, self.start, self.end), (kept.scores, kept.start, kept.end)):
                p.copy_(torch.tensor(value))

    def export(self) -> Transitions:
        rows = self.transitions.detach().float().cpu().tolist()
        return Transitions(
            tuple(map(tuple, rows)), tuple(self.start.detach().cpu().tolist()), tuple(self.end.detach().cpu().tolist())
        )


def word_emissions(logits: torch.Tensor, gold: torch.Tensor, ignore: int):
    """The logits and labels of each window's labelled positions (a word's first sub-token of the words it owns),
    packed to the left: ``(emissions (N, W, K), tags (N, W), mask (N, W))``, rows without a label dropped."""
    labelled = gold != ignore
    counts = labelled.sum(1)
    keep = counts > 0
    logits, gold, labelled, counts = logits[keep], gold[keep], labelled[keep], counts[keep]
    width = int(counts.max()) if len(counts) else 0
    order = torch.sort((~labelled).to(torch.int8), dim=1, stable=True).indices[:, :width]  # labelled first, in order
    emissions = logits.float().gather(1, order[:, :, None].expand(-1, -1, logits.shape[-1]))
    tags = gold.gather(1, order)
    mask = torch.arange(width, device=gold.device)[None, :] < counts[:, None]
    return emissions, tags.masked_fill(~mask, 0), mask


def crf_loss(
    crf: CRF, logits: torch.Tensor, gold: torch.Tensor, divisor: float, world: int, ignore: int, token: float = 0.0
):
    """As ``token_loss``: ``(loss to backpropagate, summed loss)``, the CRF's summed negative log-likelihood over
    this process's windows divided as the cross-entropy's sum is (per labelled word), so the learning rates and
    gradient clipping that suit one suit the other; plus ``token`` times the words' summed cross-entropy (a model
    trained by the CRF alone may score words only relative to their neighbours, which argmax cannot read)."""
    emissions, tags, mask = word_emissions(logits, gold, ignore)
    if not len(tags):
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    loss_sum = crf.nll(emissions, tags, mask)
    if token:
        ce = torch.nn.functional.cross_entropy(emissions[mask], tags[mask], reduction="sum")
        loss_sum = loss_sum + token * ce
    return loss_sum * (world / max(1, divisor)), loss_sum
