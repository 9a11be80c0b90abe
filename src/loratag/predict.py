"""`loratag predict` input and output formats around Tagger.tag_documents."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .data import JSONL_EXT, DataError, read_text
from .inference import TaggedDocument, Tagger
from .text import Word, entities

CONLL = (".conll", ".tsv")  # pre-split words; unlike training data, .txt here is raw text
COLOURS = ["31", "32", "33", "34", "35", "36", "91", "92", "93", "94", "95", "96"]


def read_texts(path: Path) -> list[str] | list[list[str]]:
    """Documents of an input: a folder of .txt files (one document each), JSON Lines with a "text" field,
    CoNLL (pre-split words: a list of word lists is returned), or plain text with one document per line."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path}: no .txt files (each .txt file is one document)")
        return [read_text(p) for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix in CONLL:
        return _conll_words(path)
    text = read_text(path)
    if path.suffix in JSONL_EXT:
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


def _conll_words(path: Path) -> list[list[str]]:
    """Words (first column) of a CoNLL file, one list per sentence; tags, if any, are ignored."""
    out, cur = [], []
    for line in [*read_text(path).splitlines(), ""]:
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
    for words, (labels, scores) in zip(sentences, tagger.word_predictions(sentences, progress)):
        text, ws, pos = " ".join(words), [], 0
        for w in words:
            ws.append(Word(w, pos, pos + len(w)))
            pos += len(w) + 1
        docs.append(TaggedDocument(text, ws, labels, scores, entities(text, ws, labels, scores)))
    return docs


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


def predict(tagger: Tagger, texts: list, output: Path | None, words: bool, progress: bool) -> int:
    """Tag documents (strings, or word lists from CoNLL) and write them; returns the number of documents."""
    if texts and isinstance(texts[0], list):
        docs = tag_pre_split(tagger, texts, progress)
    else:
        docs = tagger.tag_documents(texts, progress)
    if output is None:
        show(docs, tagger.labels.types, words)
        return len(docs)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        (write_jsonl if output.suffix in JSONL_EXT else write_conll)(docs, f)
    tmp.replace(output)
    return len(docs)
