"""Label sets and IOB2 tag utilities (stdlib only)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TRANSITIONS = "transitions.json"  # beside a --crf run's adapter: the learned transition scores (labels.Transitions)


@dataclass(frozen=True)
class Transitions:
    """A linear-chain CRF's learned scores (``--crf``): ``scores[i][j]`` for label j after label i, ``start[j]`` for
    j opening a sentence, ``end[i]`` for i closing one. Constrained decoding adds them to the word log-probabilities;
    IOB2's rule (``may_follow``) still forbids what it forbids."""

    scores: tuple[tuple[float, ...], ...]
    start: tuple[float, ...]
    end: tuple[float, ...]

    def arrays(self):
        import numpy as np

        return tuple(np.asarray(x, dtype=np.float32) for x in (self.scores, self.start, self.end))

    def to_dict(self, labels: Sequence[str]) -> dict:
        return {"labels": list(labels), "scores": [list(r) for r in self.scores], "start": list(self.start),
                "end": list(self.end)}  # fmt: skip

    @classmethod
    def read(cls, folder: Path, labels: Sequence[str]) -> Transitions | None:
        """``folder/transitions.json`` (an adapter folder), checked against its labels; None where there is none."""
        path = Path(folder) / TRANSITIONS
        if not path.is_file():
            return None
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), labels, str(path))

    @classmethod
    def from_dict(cls, d: dict, labels: Sequence[str], where: str) -> Transitions:
        """Checked against the adapter's label order: scores in another order would decode silently wrong."""
        if list(d.get("labels", [])) != list(labels):
            raise ValueError(
                f"{where}: transitions for labels {d.get('labels')}, but the adapter's are {list(labels)}"
            )
        k = len(labels)
        scores, start, end = d.get("scores"), d.get("start"), d.get("end")
        if not (
            len(scores or ()) == k and all(len(r) == k for r in scores) and len(start or ()) == k == len(end or ())
        ):
            raise ValueError(f"{where}: expected a {k}x{k} 'scores' matrix and 'start', 'end' of {k} numbers")
        return cls(tuple(tuple(float(x) for x in r) for r in scores), tuple(map(float, start)), tuple(map(float, end)))


@dataclass(frozen=True)
class LabelSet:
    """Labels in id order: ``labels[i]`` is the label of class ``i``; ``transitions``: what a ``--crf`` adapter
    learned about their order (not part of the label set's identity: two adapters with the same labels agree)."""

    labels: tuple[str, ...]
    transitions: Transitions | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate labels in {list(self.labels)}")
        for lab in self.labels:
            if lab != "O" and not (lab[:2] in ("B-", "I-") and len(lab) > 2):
                raise ValueError(f"label {lab!r} is not IOB2 (expected O, B-TYPE or I-TYPE)")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {lab: i for i, lab in enumerate(self.labels)}

    @property
    def types(self) -> list[str]:
        return sorted({lab[2:] for lab in self.labels if lab != "O"})

    @classmethod
    def from_mapping(cls, label2id: dict[str, int]) -> LabelSet:
        """From a ``{"O": 0, "B-DNA": 1, ...}`` mapping (tner's label.json)."""
        ids = sorted(label2id.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"label ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        return cls(tuple(sorted(label2id, key=label2id.__getitem__)))

    @classmethod
    def from_tags(cls, tags: Iterable[str]) -> LabelSet:
        """Sorted, ``O`` first; every type gets both its B- and I- label."""
        types = {t[2:] for t in tags if t != "O" and len(t) > 2}
        return cls(("O", *[f"{p}-{t}" for t in sorted(types) for p in ("B", "I")]))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.label2id, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LabelSet:
        return cls.from_mapping(json.loads(Path(path).read_text(encoding="utf-8")))


def repair_iob2(tags: Sequence[str]) -> tuple[list[str], int]:
    """Turn every I-X that does not continue an X entity into B-X, as conlleval reads it.

    Returns the repaired copy and the number of repairs; the input is not changed.

    >>> repair_iob2(["O", "I-DNA", "I-DNA", "I-RNA"])
    (['O', 'B-DNA', 'I-DNA', 'B-RNA'], 2)
    """
    out, fixed, prev = [], 0, "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag, fixed = "B-" + tag[2:], fixed + 1
        out.append(tag)
        prev = tag
    return out, fixed


def tags_to_spans(tags: Sequence[str]) -> list[tuple[int, int, str]]:
    """Word-index spans, end exclusive. A stray I- opens a span, as conlleval does.

    >>> tags_to_spans(["B-DNA", "I-DNA", "O", "I-RNA"])
    [(0, 2, 'DNA'), (3, 4, 'RNA')]
    """
    spans: list[tuple[int, int, str]] = []
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        continues = prefix == "I" and kind == typ
        if start is not None and not continues:
            spans.append((start, i, kind))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, typ
    return spans


def may_follow(labels: Sequence[str]) -> tuple[list[list[bool]], list[bool]]:
    """IOB2's rule as a transition table: ``allowed[i][j]`` says label j may follow label i (an I-X only after B-X
    or I-X); ``start[j]`` says label j may open a sentence (any but I-).

    >>> allowed, start = may_follow(["O", "B-DNA", "I-DNA"])
    >>> allowed[0], start
    ([True, True, False], [True, True, False])
    """
    allowed = [[not b.startswith("I-") or (a != "O" and a[2:] == b[2:]) for b in labels] for a in labels]
    return allowed, [not b.startswith("I-") for b in labels]


def viterbi(logprobs, labels: Sequence[str]) -> list[int]:
    """The label ids of the most probable IOB2-valid sequence (sum of per-word log probabilities, no I-X after O
    or after another type), for one sentence's ``(words, labels)`` log probabilities (a torch tensor). Written by
    hand: a few lines of dynamic programming, where a CRF library would also bring a trained transition matrix."""
    import torch

    allowed, start = may_follow(labels)
    block = torch.tensor([[0.0 if ok else float("-inf") for ok in row] for row in allowed])
    score = logprobs[0] + torch.tensor([0.0 if ok else float("-inf") for ok in start])
    back = []
    for t in range(1, len(logprobs)):
        total = score[:, None] + block  # (previous, current)
        best, arg = total.max(0)
        back.append(arg)
        score = best + logprobs[t]
    path = [int(score.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def viterbi_many(
    logprobs: Sequence, labels: Sequence[str], chunk: int = 256, transitions: Transitions | None = None
) -> list[list[int]]:
    """``viterbi`` for many sentences at once (the same labels): the same float32 sums in the same order, so the
    same paths, but one numpy step per word position for a chunk of sentences of similar length instead of one
    torch step per word of each sentence (decoding took ~15% of int8 prediction time one sentence at a time).
    ``transitions``: a CRF's learned scores, added to each step (and to the first and last word)."""
    import numpy as np

    allowed, start = may_follow(labels)
    k = len(labels)
    none = (np.zeros((k, k), np.float32), np.zeros(k, np.float32), np.zeros(k, np.float32))
    learned, first, last = transitions.arrays() if transitions else none
    block = np.where(np.array(allowed), learned, np.float32(-np.inf)).astype(np.float32)
    opening = np.where(np.array(start), first, np.float32(-np.inf)).astype(np.float32)
    order = sorted(range(len(logprobs)), key=lambda i: len(logprobs[i]))
    out: list[list[int]] = [[] for _ in logprobs]
    for c in range(0, len(order), chunk):
        idx = [i for i in order[c : c + chunk] if len(logprobs[i])]
        if not idx:
            continue
        lengths = np.array([len(logprobs[i]) for i in idx])
        lp = np.zeros((len(idx), lengths.max(), k), dtype=np.float32)
        for r, i in enumerate(idx):
            lp[r, : lengths[r]] = np.asarray(logprobs[i], dtype=np.float32)
        rows = np.arange(len(idx))
        score = lp[:, 0] + opening
        back = np.empty((lengths.max(), len(idx), k), dtype=np.int64)
        stay = np.broadcast_to(np.arange(k), (len(idx), k))  # past a sentence's end the path keeps its label
        for t in range(1, lengths.max()):
            total = score[:, :, None] + block  # (sentence, previous, current)
            arg = total.argmax(1)
            best = np.take_along_axis(total, arg[:, None, :], 1)[:, 0]
            active = (t < lengths)[:, None]
            back[t] = np.where(active, arg, stay)
            score = np.where(active, best + lp[:, t], score)
        path = [(score + last).argmax(1)]
        for t in range(lengths.max() - 1, 0, -1):
            path.append(back[t][rows, path[-1]])
        ids = np.stack(path[::-1], 1)
        for r, i in enumerate(idx):
            out[i] = ids[r, : lengths[r]].tolist()
    return out
