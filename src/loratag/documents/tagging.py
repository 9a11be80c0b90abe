"""Documents through the one prediction path: each passage's text tagged by ``Tagger.tag_documents`` (sentences,
words, labels, entities), the entities moved to document offsets as loratag's spans."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from itertools import islice

from .model import Document, Span


def tag_documents(tagger, docs: Sequence[Document], keep: bool = False, progress: bool = False) -> list[tuple]:
    """``(document with our spans, its tagged passages)`` for each document; ``keep``: its own spans stay beside
    ours (else they are dropped)."""
    texts = [p.text for d in docs for p in d.passages]
    groups = [i for i, d in enumerate(docs) for _ in d.passages]  # a document's passages: one context, as trained
    tagged = iter(tagger.tag_documents(texts, progress, groups=groups))
    out = []
    for d in docs:
        parts = [next(tagged) for _ in d.passages]
        ours = [
            Span(e.start + p.offset, e.end + p.offset, e.label, e.text, None, (), {}, e.score, ours=True)
            for p, t in zip(d.passages, parts)
            for e in t.entities
        ]
        spans = (*d.spans, *ours) if keep else tuple(ours)
        out.append((replace(d, spans=spans), parts))
    return out


def tag_stream(tagger, docs: Iterable[Document], keep: bool = False, chunk: int = 256) -> Iterator[tuple]:
    """``tag_documents`` over a stream, ``chunk`` documents at a time: memory stays flat on any input size."""
    docs = iter(docs)
    while batch := list(islice(docs, chunk)):
        yield from tag_documents(tagger, batch, keep)
