"""`loratag predict` around the Tagger: what is read (documents in any format documents/ reads, raw texts, CoNLL
words; gzipped or not), what is written (any format documents/ writes, by the output's name or --format), and the
terminal view."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from ..data import lines_of, read_jsonl, read_text
from ..tagger import TaggedDocument, Tagger
from ..text import Word, entities

COLOURS = ["31", "32", "33", "34", "35", "36", "91", "92", "93", "94", "95", "96"]


def suffix(path: Path) -> str:
    """The format's extension, under a ``.gz``: ``a.jsonl.gz`` -> ``.jsonl``."""
    return Path(path.name[: -len(".gz")]).suffix if path.name.endswith(".gz") else path.suffix


def read_input(path: Path, fmt: str | None = None) -> tuple[str, Iterable]:
    """What to tag in an input: ``("words", word lists)`` for pre-split words (CoNLL, tner JSON Lines), else
    ``("documents", a stream of Documents)``: a folder of .txt files (one document each, named by the file), a brat
    folder, BioC, PubTator, Label Studio, JSON Lines with a "text" field, spaCy, or plain text with one document per
    line; files may be gzipped. ``fmt``: the format, where detection cannot tell."""
    from ..documents import Document, detect, read_documents

    if path.is_dir() and fmt in (None, "text") and not any(path.glob("*.ann")):
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path}: no .txt files (each .txt file is one document) and no brat .ann files")
        return "documents", (Document.plain(p.stem, read_text(p), where=str(p)) for p in files)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    fmt = fmt or detect(path)
    if fmt == "conll":
        return "words", _conll_words("".join(lines_of(path)))
    if fmt == "tner":
        return "words", [tokens for tokens, *_ in read_jsonl(path)]
    return "documents", read_documents(path, fmt)


class Words(list):
    """Pre-split sentences, and ``docs``: a document key per sentence where the input marks documents (CoNLL's
    -DOCSTART-), so that a model trained with --context reads each sentence with its document, as evaluate does."""

    def __init__(self, sentences: list[list[str]], docs: list | None = None):
        super().__init__(sentences)
        self.docs = docs


def _conll_words(text: str) -> Words:
    """Words (first column) of a CoNLL text, one list per sentence, and its documents (-DOCSTART- lines) if any;
    tags, if any, are ignored."""
    out, cur, docs, doc, marked = [], [], [], 0, False
    for line in [*text.splitlines(), ""]:
        cols = line.split()
        if cols and cols[0] == "-DOCSTART-":
            doc, marked = doc + 1, True
            cols = []
        if not cols:
            if cur:
                out.append(cur)
                docs.append(doc)
            cur = []
        else:
            cur.append(cols[0])
    return Words(out, docs if marked else None)


def tag_pre_split(tagger: Tagger, sentences: list[list[str]], progress: bool) -> list[TaggedDocument]:
    """Pre-split words (CoNLL input): no word split; the text is the words joined by spaces."""
    docs = []
    keys = getattr(sentences, "docs", None)
    if tagger.context and keys is None:
        logging.getLogger("loratag").warning(
            "this run reads each sentence with its document around it (--context %d), but the input marks no "
            "documents (CoNLL -DOCSTART- lines): every sentence is read alone, as it was not in training",
            tagger.context,
        )
    for words, (labels, scores) in zip(sentences, tagger.tag_words(sentences, progress, docs=keys)):
        text, ws, pos = " ".join(words), [], 0
        for w in words:
            ws.append(Word(w, pos, pos + len(w)))
            pos += len(w) + 1
        docs.append(TaggedDocument(text, ws, labels, scores, entities(text, ws, labels, scores)))
    return docs


def highlight(doc: TaggedDocument, colour: bool, types: list[str]) -> str:
    """The text with its entities marked: ANSI colours on a terminal, ``[text]{label}`` elsewhere."""
    parts, pos = [], 0
    for e in doc.entities:
        parts.append(doc.text[pos : e.start])
        if colour:
            code = COLOURS[types.index(e.label) % len(COLOURS)] if e.label in types else "1"
            parts.append(f"\033[1;{code}m{e.text}\033[0m\033[2m[{e.label}]\033[0m")
        else:
            parts.append(f"[{e.text}]{{{e.label}}}")
        pos = e.end
    parts.append(doc.text[pos:])
    return "".join(parts)


def show(docs: list[TaggedDocument], types: list[str], words: bool, out=None) -> None:
    out = out or sys.stdout  # looked up now: sys.stdout may have been replaced since import
    colour = out.isatty()
    for d in docs:
        if words:
            out.writelines(f"{w.text}\t{label}\n" for w, label in zip(d.words, d.labels))
            out.write("\n")
            continue
        out.write(highlight(d, colour, types) + "\n")
        for e in d.entities:
            out.write(f"  {e.start}-{e.end}\t{e.label}\t{e.score:.2f}\t{e.text}\n")
        out.write("\n")


def predict(
    tagger: Tagger,
    source: tuple[str, Iterable],
    output: Path | None,
    fmt: str | None = None,
    words: bool = False,
    keep: bool = False,
    run: str | None = None,
    stream=None,
) -> int:
    """Tag what ``read_input`` gave and write it to ``output`` in ``fmt`` (default: by the name), a document at a
    time for documents; ``output`` None: show it on the terminal. Returns the number of documents."""
    from ..documents import Document, open_writer, output_format
    from ..documents.tagging import tag_stream

    kind, items = source
    if kind == "words":
        tagged = tag_pre_split(tagger, items if isinstance(items, Words) else list(items), output is not None)
        pairs = [
            (Document.plain("", t.text, [_span(e) for e in t.entities]), [t]) for t in tagged
        ]  # fmt: skip
    else:
        pairs = tag_stream(tagger, items, keep)
    if output is None and stream is None:
        parts = [t for _, ts in pairs for t in ts]
        show(parts, tagger.labels.types, words)
        return len(parts)
    n = 0
    with open_writer(output, output_format(output, fmt), keep=keep, run=run, stream=stream) as w:
        for doc, parts in pairs:
            w.write(doc, parts)
            n += 1
    return n


def _span(e):
    from ..documents import Span

    return Span(e.start, e.end, e.label, e.text, None, (), {}, e.score, ours=True)
