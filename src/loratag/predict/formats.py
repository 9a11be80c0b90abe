"""`loratag predict` input and output formats around the Tagger: what is read (raw texts, JSON Lines, CoNLL words;
gzipped or not), what is written (JSON Lines or CoNLL, chosen from the output's whole name), and the terminal view."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data import JSONL_EXT, DataError, decode_utf8, read_text
from ..rundir import write_atomic
from ..tagger import TaggedDocument, Tagger
from ..text import Word, entities

CONLL = (".conll", ".tsv")  # pre-split words; unlike training data, .txt here is raw text
OUTPUTS = {**dict.fromkeys(JSONL_EXT, "jsonl"), **dict.fromkeys(CONLL, "conll")}
COLOURS = ["31", "32", "33", "34", "35", "36", "91", "92", "93", "94", "95", "96"]


def suffix(path: Path) -> str:
    """The format's extension, under a ``.gz``: ``a.jsonl.gz`` -> ``.jsonl``."""
    return Path(path.name[: -len(".gz")]).suffix if path.name.endswith(".gz") else path.suffix


def _file_text(path: Path) -> str:
    """A UTF-8 file's text, gunzipped if it ends in .gz; errors name file:line."""
    if not path.name.endswith(".gz"):
        return read_text(path)
    import gzip

    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a gzip file ({e})") from None
    return decode_utf8(raw, path)


def read_texts(path: Path) -> list[str] | list[list[str]]:
    """Documents of an input: a folder of .txt files (one document each), JSON Lines with a "text" field,
    CoNLL (pre-split words: a list of word lists is returned), or plain text with one document per line;
    files may be gzipped (``.jsonl.gz`` ...)."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path}: no .txt files (each .txt file is one document)")
        return [read_text(p) for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    text = _file_text(path)
    if suffix(path) in CONLL:
        return _conll_words(text)
    if suffix(path) in JSONL_EXT:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f'{path}:{n}: not valid JSON ({e.msg}); expected {{"text": "..."}}') from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f'{path}:{n}: expected an object with a string field "text"')
            docs.append(rec["text"])
        return docs
    return text.splitlines()


def _conll_words(text: str) -> list[list[str]]:
    """Words (first column) of a CoNLL text, one list per sentence; tags, if any, are ignored."""
    out, cur = [], []
    for line in [*text.splitlines(), ""]:
        cols = line.split()
        if not cols:
            if cur:
                out.append(cur)
            cur = []
        elif cols[0] != "-DOCSTART-":
            cur.append(cols[0])
    return out


def tag_pre_split(tagger: Tagger, sentences: list[list[str]], progress: bool) -> list[TaggedDocument]:
    """Pre-split words (CoNLL input): no word split; the text is the words joined by spaces."""
    docs = []
    for words, (labels, scores) in zip(sentences, tagger.tag_words(sentences, progress)):
        text, ws, pos = " ".join(words), [], 0
        for w in words:
            ws.append(Word(w, pos, pos + len(w)))
            pos += len(w) + 1
        docs.append(TaggedDocument(text, ws, labels, scores, entities(text, ws, labels, scores)))
    return docs


def output_format(path: Path) -> str:
    """``jsonl`` or ``conll``, from the output file's whole name (``x.jsonl.gz`` is gzipped JSON Lines); an unknown
    suffix is an error, never a guess."""
    fmt = OUTPUTS.get(suffix(path))
    if fmt is None:
        known = ", ".join(OUTPUTS)
        raise ValueError(
            f"--output {path}: unknown format {suffix(path) or '(no suffix)'!r}; expected one of {known} "
            "(JSON Lines or CoNLL), optionally followed by .gz, or a folder for sharded prediction"
        )
    return fmt


def write_jsonl(docs: list[TaggedDocument], out) -> None:
    for d in docs:
        out.write(json.dumps(d.to_dict(), ensure_ascii=False) + "\n")


def write_conll(docs: list[TaggedDocument], out) -> None:
    for d in docs:
        for w, label in zip(d.words, d.labels):
            out.write(f"{w.text}\t{label}\n")
        out.write("\n")


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
            write_conll([d], out)
            continue
        out.write(highlight(d, colour, types) + "\n")
        for e in d.entities:
            out.write(f"  {e.start}-{e.end}\t{e.label}\t{e.score:.2f}\t{e.text}\n")
        out.write("\n")


def tag(tagger: Tagger, texts: list, progress: bool = False) -> list[TaggedDocument]:
    """Tagged documents of strings (raw text) or word lists (CoNLL input)."""
    if texts and isinstance(texts[0], list):
        return tag_pre_split(tagger, texts, progress)
    return tagger.tag_documents(texts, progress)


def render(docs: list[TaggedDocument], path: Path) -> bytes:
    """The bytes of output file ``path``: JSON Lines or CoNLL word/label columns, by its name (gzipped for .gz)."""
    import gzip
    import io

    buf = io.StringIO()
    (write_conll if output_format(path) == "conll" else write_jsonl)(docs, buf)
    data = buf.getvalue().encode("utf-8")
    return gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data  # mtime 0: reruns write equal bytes


def predict(tagger: Tagger, texts: list, output: Path | None, words: bool, progress: bool) -> int:
    """Tag documents (strings, or word lists from CoNLL) and write them; returns the number of documents."""
    docs = tag(tagger, texts, progress)
    if output is None:
        show(docs, tagger.labels.types, words)
        return len(docs)
    write_atomic(output, render(docs, output))
    return len(docs)
