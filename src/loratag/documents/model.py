"""Documents, loratag's unit of data: an id, passages of text at their offsets, and mentions as character spans.

Every reader returns these and every writer takes them, so each format converts to and from one model only.
Offsets are into the document's text (``Document.text``): passages sit at their offsets, any gap between them
filled with spaces, as BioC and PubTator count them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data import DataError


@dataclass(frozen=True)
class Span:
    """A mention: ``text[start:end]`` of the document, of entity ``type``. ``fragments`` holds the pieces of a
    discontinuous mention (BioC several locations, brat ``0 5;10 15``), ``start``/``end`` being its extent."""

    start: int
    end: int
    type: str
    text: str | None = None
    id: str | None = None
    fragments: tuple[tuple[int, int], ...] = ()
    infons: dict[str, Any] = field(default_factory=dict, compare=False)
    score: float | None = field(default=None, compare=False)
    ours: bool = field(default=False, compare=False)
    """Predicted by loratag (writers mark it so beside a document's own annotations)."""


@dataclass(frozen=True)
class Passage:
    offset: int
    text: str
    infons: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Document:
    id: str
    passages: tuple[Passage, ...]
    spans: tuple[Span, ...] = ()
    infons: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False)
    """Where it was read: ``file:line`` or ``file: document ID``, for messages."""
    source: Any = field(default=None, compare=False, repr=False)
    """The reader's own object (a BioCDocument), so that a writer of the same format gives back what it read."""
    text: str = field(init=False, compare=True, repr=False)

    def __post_init__(self) -> None:
        parts, pos = [], 0
        for p in self.passages:
            if p.offset < pos:
                raise DataError(
                    f"{self.where or self.id}: passage at offset {p.offset} overlaps the one before (which ends at "
                    f"{pos}); expected passages in order, each starting at or after the end of the previous one"
                )
            parts += [" " * (p.offset - pos), p.text]
            pos = p.offset + len(p.text)
        object.__setattr__(self, "text", "".join(parts))

    @classmethod
    def plain(cls, id: str, text: str, spans=(), **kw) -> Document:
        """A document of one passage at offset 0."""
        return cls(id, (Passage(0, text),), tuple(spans), **kw)

    def mentions(self) -> list[tuple[int, int, str]]:
        """``(start, end, type)`` of every span, sorted: what two documents' annotations are compared by."""
        return sorted((s.start, s.end, s.type) for s in self.spans)


def check_spans(doc: Document) -> None:
    """Empty, reversed and out-of-text spans, and a mention text that disagrees with the document's text, are
    errors naming the file, the document and the mention: a mis-aligned corpus would otherwise train on noise."""
    n = len(doc.text)
    for s in doc.spans:
        name = f"{doc.where}: mention {s.id + ' ' if s.id else ''}{s.type} at {s.start}-{s.end}"
        pieces = s.fragments or ((s.start, s.end),)
        for a, b in pieces:
            if not 0 <= a < b <= n:
                what = "empty or reversed" if b <= a else f"outside the text (0-{n})"
                raise DataError(f"{name}: span {a}-{b} is {what}; expected 0 <= start < end <= {n}")
        if s.text is None:
            continue
        found = " ".join(doc.text[a:b] for a, b in pieces)
        if _squeeze(s.text) not in (_squeeze(found), _squeeze(doc.text[s.start : s.end])):
            raise DataError(
                f"{name}: the mention text is {s.text!r} but the document's text there is {found!r}; expected "
                "offsets into the document's text (passages at their offsets)"
            )


def _squeeze(text: str) -> str:
    """White space runs as one space: formats that keep a mention's text on one line (brat, PubTator) write a line
    break inside a mention as a space."""
    return " ".join(text.split())
