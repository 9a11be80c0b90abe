"""PubTator: ``PMID|t|title`` and ``PMID|a|abstract`` lines, then ``PMID<TAB>start<TAB>end<TAB>mention<TAB>type
<TAB>concept`` lines, a blank line between documents; the text is title + one space + abstract.

Read line by line (memory does not grow with the file). By hand rather than with ``bioc.pubtator``: that parser
prints and skips a line it cannot read, where loratag stops naming the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TextIO

from ..data import DataError
from .model import Document, Passage, Span

_TEXT = re.compile(r"^([^|\t]*)\|([ta])\|(.*)$")


def looks_like(head: str) -> bool:
    """Whether the first non-blank line of a file is a PubTator title or abstract line."""
    return bool(_TEXT.match(head))


class _Doc:
    def __init__(self, pmid: str, where: str):
        self.pmid, self.where = pmid, where
        self.title: str | None = None
        self.abstract: str | None = None
        self.spans: list[Span] = []
        self.other: list[str] = []  # relation lines, kept for --keep-annotations

    def build(self) -> Document:
        passages = [Passage(0, self.title or "", {"type": "title"})]
        if self.abstract:
            passages.append(Passage(len(passages[0].text) + 1, self.abstract, {"type": "abstract"}))
        return Document(self.pmid, tuple(passages), tuple(self.spans), where=self.where, source=self.other)


def read(lines: Iterable[str], path: str) -> Iterator[Document]:
    doc: _Doc | None = None
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        where = f"{path}:{n}"
        if not line.strip():
            if doc is not None:
                yield doc.build()
            doc = None
            continue
        m = _TEXT.match(line)
        if m:
            pmid, part, text = m.groups()
            if doc is not None and (pmid != doc.pmid or (part == "t" and doc.title is not None)):
                yield doc.build()  # no blank line between two documents
                doc = None
            if doc is None:
                doc = _Doc(pmid, f"{path}: document {pmid} (line {n})")
            if part == "a" and doc.title is None:
                doc.title = ""
            setattr(doc, "title" if part == "t" else "abstract", text)
            continue
        cols = line.split("\t")
        if doc is None or cols[0] != doc.pmid:
            expected = f"document {doc.pmid}" if doc is not None else "a PMID|t|title line first"
            raise DataError(f"{where}: a line for {cols[0]!r} where {expected} was expected: {line[:80]!r}")
        if len(cols) in (4, 5) and not cols[1].isdigit():  # PMID relation id1 id2 [novelty]
            doc.other.append(line)
            continue
        if len(cols) < 5 or not cols[1].isdigit() or not cols[2].isdigit():
            raise DataError(
                f"{where}: expected PMID<TAB>start<TAB>end<TAB>mention<TAB>type[<TAB>concept] (offsets as "
                f"integers) or a relation PMID<TAB>type<TAB>id1<TAB>id2, got {line[:80]!r}"
            )
        infons = {"identifier": cols[5]} if len(cols) > 5 and cols[5] else {}
        doc.spans.append(Span(int(cols[1]), int(cols[2]), cols[4], cols[3], f"T{len(doc.spans) + 1}", (), infons))
    if doc is not None:
        yield doc.build()


class Writer:
    """PubTator out, every span of the document (and its relation lines with ``keep``): the first passage is the
    title, the rest of the text the abstract (offsets unchanged where the text has a space after the title, as
    PubTator's and BioC's do); line breaks in the text become spaces."""

    def __init__(self, out: TextIO, keep: bool = False, **_):
        self.out, self.keep = out, keep
        self.flattened = 0

    def write(self, doc: Document, tagged=None) -> None:
        text = doc.text
        if "\n" in text or "\r" in text:
            self.flattened += 1
            text = text.replace("\r", " ").replace("\n", " ")  # one character for one: offsets stay
        cut = len(doc.passages[0].text) if len(doc.passages) > 1 else len(text)
        if cut < len(text) and text[cut] != " ":
            cut = len(text)  # no space to put between title and abstract: all of it is the title
        pmid = doc.id.replace("|", "_").replace("\t", "_") or "-"
        self.out.write(f"{pmid}|t|{text[:cut]}\n{pmid}|a|{text[cut + 1 :]}\n")
        for s in doc.spans:
            concept = s.infons.get("identifier", "")  # ours have none
            self.out.write(f"{pmid}\t{s.start}\t{s.end}\t{text[s.start : s.end]}\t{s.type}\t{concept}\n")
        if self.keep and isinstance(doc.source, list):
            self.out.writelines(line + "\n" for line in doc.source)
        self.out.write("\n")

    def close(self) -> None:
        pass
