"""brat standoff: a folder of ``NAME.txt`` (the text) and ``NAME.ann`` (``T1<TAB>Type 0 5;10 15<TAB>text`` lines,
``;`` between the fragments of a discontinuous mention). Other annotation lines (relations, events, attributes,
notes) are kept aside for ``--keep-annotations``. By hand rather than with ``bioc.brat``: its reader asserts
without naming the file and line, and its writer works on whole collections.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from ..data import DataError, read_text
from ..rundir import write_atomic
from .model import Document, Passage, Span

_SAFE = re.compile(r"[^\w.-]+")
_TID = re.compile(r"T\d+")


def read(folder: Path) -> Iterator[Document]:
    anns = sorted(folder.glob("*.ann"))
    if not anns:
        raise FileNotFoundError(f"{folder}: no .ann files (brat standoff: NAME.txt beside NAME.ann)")
    for ann in anns:
        txt = ann.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{ann}: no {txt.name} beside it; expected the document's text in NAME.txt")
        yield read_pair(txt, ann)


def read_pair(txt: Path, ann: Path) -> Document:
    text = read_text(txt)
    spans, other = [], []
    for n, line in enumerate(read_text(ann).splitlines(), 1):
        if not line.strip():
            continue
        if not line.startswith("T"):
            other.append(line)
            continue
        cols = line.split("\t")
        where = f"{ann}:{n}"
        try:
            kind, _, locs = cols[1].partition(" ")
            pieces = tuple((int(a), int(b)) for a, b in (loc.split() for loc in locs.split(";")))
        except (IndexError, ValueError):
            raise DataError(
                f"{where}: expected T<N><TAB>Type start end[;start end]...<TAB>text, got {line[:80]!r}"
            ) from None
        if len(cols) != 3 or not kind:
            raise DataError(
                f"{where}: expected 3 tab-separated columns (id, type and offsets, text), got {line[:80]!r}"
            )
        start, end = min(a for a, _ in pieces), max(b for _, b in pieces)
        spans.append(Span(start, end, kind, cols[2], cols[0], pieces if len(pieces) > 1 else ()))
    return Document(txt.stem, (Passage(0, text),), tuple(spans), where=str(ann), source=other)


def _brat_id(s: Span) -> bool:
    """Whether a span keeps its id: a document's own text-bound id (``T12``), which its relation lines refer to."""
    return bool(s.id and not s.ours and _TID.fullmatch(s.id))


def file_stem(doc_id: str, n: int) -> str:
    """A file name for a document id (ids may hold characters no file name should)."""
    return _SAFE.sub("_", doc_id).strip("._") or f"doc{n}"


class Writer:
    """A folder of NAME.txt + NAME.ann, each file written atomically; loratag's mentions carry an AnnotatorNotes
    line ``loratag score=0.93`` so that a correction round tells them from the document's own."""

    def __init__(self, folder: Path, keep: bool = False, **_):
        self.folder, self.keep = Path(folder), keep
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n, self.names = 0, set()

    def write(self, doc: Document, tagged=None) -> None:
        self.n += 1
        stem = file_stem(doc.id, self.n)
        if stem in self.names:
            raise ValueError(f"two documents would both be written as {stem}.txt (ids {doc.id!r}); ids must differ")
        self.names.add(stem)
        lines, notes = [], []
        taken = {s.id for s in doc.spans if _brat_id(s)}
        t = 0
        for s in doc.spans:
            if _brat_id(s):
                name = s.id
            else:
                t += 1
                while f"T{t}" in taken:
                    t += 1
                name = f"T{t}"
            pieces = s.fragments or ((s.start, s.end),)
            locs = ";".join(f"{a} {b}" for a, b in pieces)
            mention = " ".join(" ".join(doc.text[a:b].split()) for a, b in pieces)  # one line in the .ann
            lines.append(f"{name}\t{s.type} {locs}\t{mention}")
            if s.ours:
                notes.append((name, f"loratag score={s.score}" if s.score is not None else "loratag"))
        lines += [f"#{i}\tAnnotatorNotes {name}\t{note}" for i, (name, note) in enumerate(notes, 1)]
        if self.keep and isinstance(doc.source, list):
            lines += doc.source
        write_atomic(self.folder / f"{stem}.txt", doc.text.encode("utf-8"))
        write_atomic(self.folder / f"{stem}.ann", "".join(line + "\n" for line in lines).encode("utf-8"))

    def close(self) -> None:
        pass
