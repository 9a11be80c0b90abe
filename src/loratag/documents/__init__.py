"""Documents in and out: which format a file is (from its name and its content), reading it as ``Document``s,
and writing ``Document``s in any format loratag writes.

| format | read | written by name | notes |
|---|---|---|---|
| bioc-xml | ``.xml``, ``.bioc.xml``, content ``<`` | ``.bioc.xml``, ``.xml`` | streamed both ways |
| bioc-json | ``.bioc.json``, a collection or documents | ``.bioc.json`` | a collection |
| pubtator | ``.pubtator``, any ``.txt`` of ``PMID|t|`` lines | ``.pubtator`` | streamed both ways |
| brat | a folder of ``.txt`` + ``.ann`` | ``--format brat`` (a folder) | |
| labelstudio | JSON list of tasks with ``data`` | ``.labelstudio.json`` | predictions to import |
| jsonl | JSON Lines with ``text`` (+ Prodigy ``spans``, doccano ``label``, loratag ``entities``) | ``.jsonl`` | |
| prodigy | (read as jsonl) | ``--format prodigy`` | ``{"text", "spans"}`` |
| spacy | ``.spacy`` (DocBin) | ``.spacy`` | needs spaCy |
| conll | (sentences, see data.py) | ``.conll``, ``.tsv`` | words and labels |

Every file may be gzipped (``.gz``), except ``.spacy`` and brat folders.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from ..data import DataError, lines_of, open_binary
from .model import Document, Passage, Span, check_spans

__all__ = ["Document", "Passage", "Span", "check_spans", "detect", "read_documents", "open_writer", "output_format"]

WRITE_SUFFIXES = {
    ".bioc.xml": "bioc-xml",
    ".bioc.json": "bioc-json",
    ".labelstudio.json": "labelstudio",
    ".pubtator.txt": "pubtator",
    ".prodigy.jsonl": "prodigy",
    ".xml": "bioc-xml",
    ".pubtator": "pubtator",
    ".spacy": "spacy",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".conll": "conll",
    ".tsv": "conll",
}
WRITE_FORMATS = ("jsonl", "conll", "bioc-xml", "bioc-json", "pubtator", "brat", "spacy", "labelstudio", "prodigy")
READ_FORMATS = ("bioc-xml", "bioc-json", "pubtator", "brat", "labelstudio", "jsonl", "spacy", "tner", "conll", "text")
SENTENCE_FORMATS = ("tner", "conll")  # sentences of words and tags, not documents: data.py reads them
HEAD = 1 << 16


def name_suffix(path: Path) -> str:
    """The format part of a file name, below any ``.gz``: the longest known suffix (``a.bioc.xml.gz`` ->
    ``.bioc.xml``), else the last one."""
    name = path.name.lower().removesuffix(".gz")
    return next((s for s in WRITE_SUFFIXES if name.endswith(s)), Path(name).suffix)


def output_format(path: Path, fmt: str | None = None) -> str:
    """The format to write ``path`` in: ``fmt`` if given, else from the name; an unknown suffix is an error."""
    if fmt is not None:
        if fmt not in WRITE_FORMATS:
            raise ValueError(f"--format {fmt}: expected one of {', '.join(WRITE_FORMATS)}")
        return fmt
    found = WRITE_SUFFIXES.get(name_suffix(path))
    if found is None:
        raise ValueError(
            f"--output {path}: unknown format {name_suffix(path) or '(no suffix)'!r}; expected one of "
            f"{', '.join(WRITE_SUFFIXES)} (optionally .gz), or --format {'|'.join(WRITE_FORMATS)}"
        )
    return found


def _head(path: Path) -> str:
    try:
        with open_binary(path) as f:
            return f.read(HEAD).decode("utf-8", errors="replace")
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def detect(path: Path) -> str:
    """The format of an input, from its name where the name says it, else from its first bytes."""
    from .pubtator import looks_like

    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.ann")):
            return "brat"
        raise DataError(f"{path}: a folder without .ann files; expected brat standoff (NAME.txt + NAME.ann)")
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    by_name = {".bioc.xml": "bioc-xml", ".xml": "bioc-xml", ".bioc.json": "bioc-json", ".pubtator": "pubtator",
               ".labelstudio.json": "labelstudio", ".spacy": "spacy", ".conll": "conll", ".tsv": "conll"}  # fmt: skip
    if name_suffix(path) in by_name:
        return by_name[name_suffix(path)]
    head = _head(path)
    body = head.lstrip("\ufeff \t\r\n")
    first = body.split("\n", 1)[0].strip()
    if body.startswith("<"):
        return "bioc-xml"
    if looks_like(first):
        return "pubtator"
    if body.startswith("["):
        if '"data"' in head:
            return "labelstudio"
        return "bioc-json"
    if body.startswith("{"):
        try:
            rec = json.loads(first)
        except json.JSONDecodeError:  # one object over many lines: a BioC collection, pretty-printed
            return "bioc-json" if '"documents"' in head or '"passages"' in head else "jsonl"
        if isinstance(rec, dict) and "tokens" in rec and "tags" in rec:
            return "tner"
        if isinstance(rec, dict) and ("passages" in rec or "documents" in rec):
            return "bioc-json"
        return "jsonl"
    if name_suffix(path) in (".json", ".jsonl"):
        return "jsonl"
    return "text"


def read_documents(path: str | Path, fmt: str | None = None) -> Iterator[Document]:
    """The documents of an input file (or brat folder), streamed where the format allows, each checked
    (``check_spans``): a bad file stops with one line naming the file and the line or document."""
    path = Path(path)
    fmt = fmt or detect(path)
    for doc in _read(path, fmt):
        check_spans(doc)
        yield doc


def _read(path: Path, fmt: str) -> Iterator[Document]:
    from . import biocfmt, brat, docbin, jsonspans, pubtator

    where = str(path)
    if fmt == "bioc-xml":
        with open_binary(path) as f:
            yield from biocfmt.read_xml(f, where)
    elif fmt == "bioc-json":
        yield from biocfmt.read_json(path, _head(path))
    elif fmt == "pubtator":
        yield from pubtator.read(lines_of(path), where)
    elif fmt == "brat":
        yield from brat.read(path) if path.is_dir() else [brat.read_pair(path.with_suffix(".txt"), path)]
    elif fmt == "labelstudio":
        yield from jsonspans.read_labelstudio(path)
    elif fmt == "jsonl":
        yield from jsonspans.read_jsonl(lines_of(path), where)
    elif fmt == "spacy":
        yield from docbin.read(path.read_bytes(), where)
    elif fmt == "text":
        for n, line in enumerate(lines_of(path), 1):
            if line.strip():
                yield Document.plain("", line.rstrip("\r\n"), where=f"{where}:{n}")
    elif fmt in SENTENCE_FORMATS:
        raise DataError(f"{path}: {fmt} holds sentences of words and tags, not documents")
    else:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(READ_FORMATS)}")


class ConllWriter:
    """Word and label columns of the tagged sentences (a blank line after each passage)."""

    def __init__(self, out, **_):
        self.out = out

    def write(self, doc: Document, tagged=None) -> None:
        if tagged is None:
            raise ValueError("CoNLL output holds predicted words and labels: only predict writes it")
        for t in tagged:
            for w, label in zip(t.words, t.labels):
                self.out.write(f"{w.text}\t{label}\n")
            self.out.write("\n")

    def close(self) -> None:
        pass


@contextlib.contextmanager
def open_writer(path: Path, fmt: str, keep: bool = False, run: str | None = None, stream=None):
    """A writer (``.write(doc, tagged=None)``) of documents to ``path`` in ``fmt``: written through a temporary file
    and renamed at the end (brat: each file so), gzipped for a ``.gz`` name. ``keep``: also the source documents'
    own relations and other annotation lines. ``stream``: write into this binary stream instead of ``path``."""
    from ..rundir import atomic_stream
    from . import biocfmt, brat, docbin, jsonspans, pubtator

    if fmt == "brat":
        w = brat.Writer(path, keep=keep)
        yield w
        w.close()
        return
    text_writers = {
        "jsonl": jsonspans.JsonlWriter,
        "prodigy": jsonspans.ProdigyWriter,
        "labelstudio": jsonspans.LabelStudioWriter,
        "bioc-json": biocfmt.JsonWriter,
        "pubtator": pubtator.Writer,
        "conll": ConllWriter,
    }
    with contextlib.ExitStack() as stack:
        raw = stream if stream is not None else stack.enter_context(atomic_stream(path))
        if path.name.endswith(".gz") and fmt != "spacy":
            raw = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))
        text = None
        if fmt == "bioc-xml":
            w = biocfmt.XmlWriter(raw, keep=keep, run=run)
        elif fmt == "spacy":
            w = docbin.Writer(raw)
        elif fmt in text_writers:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="", write_through=True)
            w = text_writers[fmt](text, keep=keep, run=run)
        else:
            raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(WRITE_FORMATS)}")
        yield w
        w.close()
        if text is not None:
            text.flush()
            text.detach()  # leave ``raw`` open: the gzip and atomic layers finish it
