"""spaCy ``DocBin`` files (``.spacy``), through spaCy itself (``pip install 'loratag[spacy]'``): documents'
``ents`` are the mentions, ``user_data["id"]`` the id. Written Docs are tokenized by loratag's word splitter, cut
at every mention boundary, with white space kept as spaCy keeps it, so ``doc.text`` is the document's text and
every mention is exactly a ``Span`` of the Doc. A DocBin is one msgpack object: it is built in memory."""

from __future__ import annotations

from collections.abc import Iterator

from ..data import DataError
from ..text import split_words
from .model import Document, Span


def _spacy():
    try:
        import spacy  # noqa: F401
        from spacy.tokens import Doc, DocBin
        from spacy.vocab import Vocab
    except ImportError:
        raise ImportError("reading or writing .spacy files needs spaCy: pip install 'loratag[spacy]'") from None
    return Doc, DocBin, Vocab


def read(data: bytes, path: str) -> Iterator[Document]:
    _, DocBin, Vocab = _spacy()
    try:
        docs = DocBin().from_bytes(data).get_docs(Vocab())
        for n, d in enumerate(docs, 1):
            spans = [Span(e.start_char, e.end_char, e.label_, e.text) for e in d.ents]
            doc_id = str(d.user_data.get("id", "")) if d.user_data else ""
            yield Document.plain(doc_id, d.text, spans, where=f"{path}: doc {n}")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a spaCy DocBin ({type(e).__name__}: {e})") from None


def words_and_spaces(text: str, cuts: set[int]) -> tuple[list[str], list[bool]]:
    """spaCy's (words, spaces) for ``text``: loratag's words, also cut at ``cuts``; white space other than one space
    after a word becomes a token of its own, as spaCy's tokenizer makes it.

    >>> words_and_spaces("IL-2  binds\\n", {2})
    (['IL', '-2', ' ', 'binds', '\\n'], [False, True, False, False, False])
    """
    words: list[str] = []
    spaces: list[bool] = []
    pos = 0

    def white(upto: int) -> None:  # the text between the last word and ``upto``
        gap = text[pos:upto]
        if gap and words and gap[0] == " ":
            spaces[-1], gap = True, gap[1:]
        if gap:
            words.append(gap)
            spaces.append(False)

    for w in split_words(text):
        edges = [w.start, *sorted(c for c in cuts if w.start < c < w.end), w.end]
        for a, b in zip(edges, edges[1:]):
            white(a)
            words.append(text[a:b])
            spaces.append(False)
            pos = b
    white(len(text))
    return words, spaces


class Writer:
    def __init__(self, stream, **_):
        Doc, DocBin, Vocab = _spacy()
        self.stream, self.Doc, self.vocab = stream, Doc, Vocab()
        # only what the Docs hold (words, entities): DocBin keeps every attribute of every token in memory until
        # the file is written, and its default thirteen multiply that memory by four
        self.bin = DocBin(attrs=["ORTH", "ENT_IOB", "ENT_TYPE"], store_user_data=True)

    def write(self, doc: Document, tagged=None) -> None:
        cuts = {x for s in doc.spans for x in (s.start, s.end)}
        words, spaces = words_and_spaces(doc.text, cuts)
        d = self.Doc(self.vocab, words=words, spaces=spaces)
        ours = any(s.ours for s in doc.spans)
        ents, kept = [], []
        for s in sorted(doc.spans, key=lambda s: (s.start, s.end)):
            span = d.char_span(s.start, s.end, label=s.type)
            if span is None:  # a mention of white space only: no token starts there
                raise ValueError(f"document {doc.id!r}: mention {s.start}-{s.end} is not on token boundaries")
            (ents if s.ours or not ours else kept).append(span)
        try:
            d.set_ents(ents)  # ours never overlap; a document's own spans go to doc.spans["annotations"] beside them
        except ValueError as e:
            raise ValueError(f"document {doc.id!r}: overlapping mentions cannot all be doc.ents ({e})") from None
        if kept:
            d.spans["annotations"] = kept
        d.user_data["id"] = doc.id
        self.bin.add(d)

    def close(self) -> None:
        self.stream.write(self.bin.to_bytes())
