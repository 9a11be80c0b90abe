"""Raw text -> sentences of words with character offsets, and word labels -> entities (stdlib only)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .labels import tags_to_spans

# GENIA/JNLPBA-style word split (the rules in the BioNLP2004 README): brackets, commas, semicolons,
# colons, %, =, <, >, &, ?, ! and double quotes are words of their own; hyphens, slashes, plus signs and
# inner periods stay inside words (IL-2, C/EBP, CD4+, PU.1, 0.05). A word-final period is split off when
# it ends the text or is followed by white space and a capital, a digit, a bracket or a gene-like
# lower-case word (p53, c-Jun). 's and n't are split off as in the corpus.
_PUNCT = r"()\[\]{},;:%=<>&?!\"“”‘’"
_WORD = re.compile(rf"[{_PUNCT}]|[^\s{_PUNCT}]+")
_FINAL_PERIOD = re.compile(r"\.(?=\s+(?:[A-Z0-9(\[]|[a-z]+-?[0-9A-Z])|\s*$)")
_CLITIC = re.compile(r"(?i)(?<=\w)(n't|'s)$")
# abbreviations whose period never ends a sentence
_ABBREV = {"e.g", "i.e", "vs", "et al", "al", "cf", "Fig", "fig", "Figs", "approx", "ca", "Dr", "Mr", "Mrs", "no"}


@dataclass(frozen=True)
class Word:
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Entity:
    text: str
    label: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict:
        return asdict(self)


def count_words(text: str) -> int:
    """How many words ``split_words`` finds, near enough to cap work by (sentence-final periods and clitics such
    as n't, which it splits off, are not counted apart here); one C-level regex pass, no words built.

    >>> count_words("IL-2 (interleukin-2) binds.")
    5
    """
    return sum(1 for _ in _WORD.finditer(text))


def split_words(text: str) -> list[Word]:
    """Words with character offsets into ``text`` (``text[w.start:w.end] == w.text`` always).

    >>> [w.text for w in split_words("IL-2 (and NF-kappa B) binds DNA.")]
    ['IL-2', '(', 'and', 'NF-kappa', 'B', ')', 'binds', 'DNA', '.']
    """
    words = []
    for m in _WORD.finditer(text):
        s, e = m.start(), m.end()
        if e - s > 1 and text[e - 1] == "." and _FINAL_PERIOD.match(text, e - 1) and text[s : e - 1] not in _ABBREV:
            words += _clitics(text, s, e - 1) + [Word(".", e - 1, e)]
        else:
            words += _clitics(text, s, e)
    return words


def _clitics(text: str, s: int, e: int) -> list[Word]:
    m = _CLITIC.search(text, s, e)
    if m and m.start() > s:
        return [Word(text[s : m.start()], s, m.start()), Word(text[m.start() : e], m.start(), e)]
    return [Word(text[s:e], s, e)]


def split_sentences(text: str) -> list[list[Word]]:
    """Sentences of words. A sentence ends at a split-off period, ?, or ! (followed by a new sentence or the
    end), and at a blank line.

    >>> [[w.text for w in s] for s in split_sentences("IL-2 binds. T cells grow!")]
    [['IL-2', 'binds', '.'], ['T', 'cells', 'grow', '!']]
    """
    sentences, cur = [], []
    words = split_words(text)
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if cur and text.count("\n", cur[-1].end, w.start) >= 2:
            sentences.append(cur)
            cur = []
        cur.append(w)
        opens = nxt is None or nxt.text[:1].isupper() or nxt.text[:1].isdigit() or nxt.text in ("(", "[")
        if w.text in (".", "?", "!") and opens:
            sentences.append(cur)
            cur = []
    if cur:
        sentences.append(cur)
    return sentences


def entities(text: str, words: Sequence[Word], labels: Sequence[str], scores: Sequence[float]) -> list[Entity]:
    """Decode IOB2 word labels into entities with offsets into ``text`` and the mean word score.

    >>> ws = split_words("NF-kappa B binds")
    >>> entities("NF-kappa B binds", ws, ["B-protein", "I-protein", "O"], [0.9, 0.7, 1.0])
    [Entity(text='NF-kappa B', label='protein', start=0, end=10, score=0.8)]
    """
    out = []
    for s, e, kind in tags_to_spans(labels):
        start, end = words[s].start, words[e - 1].end
        out.append(Entity(text[start:end], kind, start, end, round(sum(scores[s:e]) / (e - s), 4)))
    return out
