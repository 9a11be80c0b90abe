"""Documents -> sentences of words with IOB2 tags, by the splitter `predict` uses; and what does not fit flat IOB2,
repaired and counted, never dropped without a word.

The policy (``SpanPolicy``): ``--types`` keeps some types, ``--type-map`` renames or merges them; a discontinuous
mention keeps its first fragment or its whole extent; of overlapping or nested mentions the longest (or the
first) is kept. Then each passage is split into sentences and words; a word that a mention begins or ends inside
is split there, and sentences that a mention runs across are joined, so every kept mention becomes whole words.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ..data import DataError, Sentence
from ..text import Word, split_sentences
from .model import Document, Span

OVERLAPS = ("longest", "first")
DISCONTINUOUS = ("first", "extent")


@dataclass(frozen=True)
class SpanPolicy:
    types: tuple[str, ...] | None = None
    type_map: dict[str, str] = field(default_factory=dict)
    overlaps: str = "longest"
    discontinuous: str = "first"

    @classmethod
    def parse_map(cls, items: Iterable[str] | None) -> dict[str, str]:
        """``("SpecificDisease=Disease", ...)`` -> ``{"SpecificDisease": "Disease"}``."""
        out = {}
        for item in items or ():
            old, eq, new = item.partition("=")
            if not eq or not old.strip() or not new.strip():
                raise ValueError(f"--type-map {item!r}: expected OLD=NEW (comma-separated pairs)")
            out[old.strip()] = new.strip()
        return out


def select(doc: Document, policy: SpanPolicy, repairs: Counter) -> list[Span]:
    """The document's mentions after ``--type-map``, ``--types`` and the discontinuous rule (the gold mentions that
    character-level scores compare with), sorted."""
    out = []
    for s in doc.spans:
        kind = policy.type_map.get(s.type, s.type)
        if kind != s.type:
            repairs[f"type {s.type} read as {kind} (--type-map)"] += 1
        if policy.types is not None and kind not in policy.types:
            repairs[f"type {kind} left out (--types)"] += 1
            continue
        if s.fragments:
            if policy.discontinuous == "first":
                a, b = s.fragments[0]
                repairs["discontinuous mentions: first fragment kept"] += 1
            else:
                a, b = s.start, s.end
                repairs["discontinuous mentions: whole extent kept"] += 1
            s = replace(s, start=a, end=b, fragments=(), text=None)
        if not doc.text[s.start : s.end].strip():
            repairs["mentions of white space only, left out"] += 1
            continue
        out.append(replace(s, type=kind))
    return sorted(out, key=lambda s: (s.start, s.end, s.type))


def flatten(spans: list[Span], policy: SpanPolicy, repairs: Counter) -> list[Span]:
    """Non-overlapping mentions: the longest first (ties: the earlier), or the earliest first."""
    if policy.overlaps == "longest":
        order = sorted(spans, key=lambda s: (-(s.end - s.start), s.start))
    else:
        order = sorted(spans, key=lambda s: (s.start, -(s.end - s.start)))
    kept: list[Span] = []
    for s in order:
        if any(s.start < k.end and k.start < s.end for k in kept):
            repairs[f"overlapping mentions left out (--overlaps {policy.overlaps})"] += 1
        else:
            kept.append(s)
    return sorted(kept, key=lambda s: s.start)


def _cut(words: list[Word], cuts: list[int], text: str, offset: int, repairs: Counter) -> list[Word]:
    """Words with absolute offsets, each split where a mention begins or ends inside it."""
    out = []
    for w in words:
        a, b = w.start + offset, w.end + offset
        inner = [c for c in cuts if a < c < b]
        if inner:
            repairs["words split where a mention begins or ends inside them"] += 1
        edges = [a, *inner, b]
        out += [Word(text[x:y], x, y) for x, y in zip(edges, edges[1:])]
    return out


def to_sentences(doc: Document, spans: list[Span], repairs: Counter) -> list[Sentence]:
    """The document's sentences, tagged IOB2 from ``spans`` (non-overlapping, sorted); each sentence knows its
    document and its words' offsets into the document's text."""
    cuts = sorted({x for s in spans for x in (s.start, s.end)})
    sentences: list[list[Word]] = []
    for p in doc.passages:
        for sent in split_sentences(p.text):
            words = _cut(sent, cuts, doc.text, p.offset, repairs)
            if sentences and words and _crossed(spans, sentences[-1][-1], words[0]):
                if sentences[-1][-1].end <= p.offset:
                    s = next(s for s in spans if s.start < words[0].start and s.end > sentences[-1][-1].start)
                    raise DataError(
                        f"{doc.where}: mention {s.id or ''} {s.type} at {s.start}-{s.end} runs across two passages; "
                        "expected each mention inside one passage"
                    )
                sentences[-1] += words
                repairs["sentences joined where a mention ran across their end"] += 1
            elif words:
                sentences.append(words)
    out, i = [], 0
    for words in sentences:
        tags, prev = [], None
        for w in words:
            while i < len(spans) and spans[i].end <= w.start:
                i += 1
            if i < len(spans) and spans[i].start <= w.start and w.end <= spans[i].end:
                tags.append(("I-" if prev == i else "B-") + spans[i].type)
                prev = i
            else:
                tags.append("O")
                prev = None
        offsets = tuple((w.start, w.end) for w in words)
        out.append(Sentence(tuple(w.text for w in words), tuple(tags), doc.id, offsets))
    return out


def _crossed(spans: list[Span], last: Word, first: Word) -> bool:
    return any(s.start <= last.start and s.end >= first.end for s in spans)


@dataclass
class DocumentSplit:
    """A split read from documents: its sentences, and its documents with the gold mentions to score against."""

    sentences: list[Sentence]
    documents: list[Document]


def split_of(docs: Iterable[Document], policy: SpanPolicy, repairs: Counter) -> DocumentSplit:
    sentences, kept = [], []
    for doc in docs:
        gold = select(doc, policy, repairs)
        sentences += to_sentences(doc, flatten(gold, policy, repairs), repairs)
        kept.append(replace(doc, spans=tuple(gold), source=None))
    return DocumentSplit(sentences, kept)
