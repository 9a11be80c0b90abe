"""BioC XML and JSON through the ``bioc`` package (the format's reference Python library): XML is read document by
document (lxml iterparse: memory does not grow with the file) and written the same way; JSON is a collection
object, a list of documents, or JSON Lines of documents (as PubTator Central exports them).

Mentions come from annotations at document, passage and sentence level; the entity type is the ``type`` infon.
A document read from BioC is written back with its id, infons and passages as they were and its annotations
replaced by loratag's (kept beside them with ``keep``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import BinaryIO, TextIO

from ..data import DataError, json_records, lines_of, open_binary
from .model import Document, Passage, Span

TYPE_KEYS = ("type", "Type", "entity_type", "class")


def _type(ann, where: str) -> str:
    for key in TYPE_KEYS:
        if ann.infons.get(key):
            return str(ann.infons[key])
    raise DataError(f"{where}: annotation {ann.id!r} has no 'type' infon; expected <infon key=\"type\">TYPE</infon>")


def _annotations(d):
    yield from d.annotations
    for p in d.passages:
        yield from p.annotations
        for s in p.sentences:
            yield from s.annotations


def from_bioc(d, path: str) -> Document:
    """loratag's Document of a ``bioc.BioCDocument``."""
    where = f"{path}: document {d.id}"
    passages = []
    for p in d.passages:
        if p.text is None and p.sentences:  # text only in the sentences: each sentence a passage
            passages += [Passage(s.offset, s.text or "", dict(p.infons)) for s in p.sentences]
        else:
            passages.append(Passage(p.offset, p.text or "", dict(p.infons)))
    spans = []
    for ann in _annotations(d):
        if not ann.locations:
            raise DataError(f"{where}: annotation {ann.id!r} has no location; expected offset and length")
        pieces = tuple(sorted((loc.offset, loc.offset + loc.length) for loc in ann.locations))
        infons = {k: v for k, v in ann.infons.items() if k not in TYPE_KEYS}
        start, end = pieces[0][0], max(b for _, b in pieces)
        spans.append(Span(start, end, _type(ann, where), ann.text, ann.id, pieces if len(pieces) > 1 else (), infons))
    try:
        return Document(str(d.id), tuple(passages), tuple(spans), dict(d.infons), where, source=d)
    except DataError:
        raise
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: {e}") from None


def read_xml(stream: BinaryIO, path: str) -> Iterator[Document]:
    """Each <document> as it ends, parsed by bioc's own decoder and then cleared from the tree: bioc's
    BioCXMLDocumentReader iterates too but keeps every parsed element, so its memory grows with the file."""
    from bioc.biocxml.decoder import BioCXMLDecoder
    from lxml import etree

    parse_document = BioCXMLDecoder()._BioCXMLDecoder__parse_document  # bioc pinned (2.1): its one document parser
    try:
        for _, elem in etree.iterparse(stream, events=("end",), tag="document", huge_tree=True):
            d = parse_document(elem)
            elem.clear()
            while elem.getprevious() is not None:  # the documents before it, now empty, leave the tree too
                del elem.getparent()[0]
            yield from_bioc(d, path)
    except etree.XMLSyntaxError as e:
        raise DataError(f"{path}:{e.lineno}: not well-formed XML ({e.msg}); expected a BioC <collection>") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a BioC collection ({type(e).__name__}: {e})") from None


def read_json(path: Path, head: str) -> Iterator[Document]:
    """BioC JSON streamed with ijson (a collection's documents one by one, or a list's items), or JSON Lines of
    documents line by line: memory does not grow with the file. ``head``: the file's first bytes, to tell which."""
    import ijson
    from bioc.biocjson.decoder import parse_doc

    where = str(path)

    def docs_of(obj, at):
        if isinstance(obj, list):
            for item in obj:
                yield from docs_of(item, at)
        elif isinstance(obj, dict) and "documents" in obj:
            yield from docs_of(obj["documents"], at)
        elif isinstance(obj, dict) and "passages" in obj:
            try:
                body = {"infons": {}, "relations": [], **obj, "passages": [_passage(p) for p in obj["passages"]]}
                d = parse_doc(body)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{at}: document {obj.get('id')!r}: expected BioC JSON, missing or bad {e}") from None
            yield from_bioc(d, where)
        else:
            raise DataError(f"{at}: expected a BioC collection, document or list of documents")

    body = head.lstrip("\ufeff \t\r\n")
    first = body.split("\n", 1)[0]
    try:
        lines = body.startswith("{") and isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        lines = False
    if lines:  # JSON Lines: a document (or collection) per line
        for obj, at in json_records(lines_of(path), where, "a BioC document per line"):
            yield from docs_of(obj, at)
        return
    prefix = "item" if body.startswith("[") else "documents.item" if '"documents"' in head else ""
    with open_binary(path) as f:
        try:
            for obj in ijson.items(f, prefix, use_float=True):
                yield from docs_of(obj, where)
        except ijson.JSONError as e:
            raise DataError(f"{where}: not valid JSON ({e}); expected BioC JSON") from None


def _passage(p: dict) -> dict:
    """BioC JSON as PubTator Central writes it leaves out empty lists; the bioc decoder wants every key."""
    anns = [{"infons": {}, "text": None, **a} for a in p.get("annotations", [])]
    return {"infons": {}, "sentences": [], "relations": [], **p, "annotations": anns}


def to_bioc(doc: Document, keep: bool, run: str | None):
    """A ``bioc.BioCDocument`` of ``doc``: its passages and infons as read, its spans as annotations (ours marked
    ``annotator: loratag``), and the source document's relations and sentences with ``keep``."""
    from bioc import BioCAnnotation, BioCDocument, BioCLocation, BioCPassage

    out = BioCDocument()
    out.id, out.infons = doc.id, {k: str(v) for k, v in doc.infons.items()}
    passages = []
    for p in doc.passages:
        bp = BioCPassage()
        bp.offset, bp.text, bp.infons = p.offset, p.text, {k: str(v) for k, v in p.infons.items()}
        out.add_passage(bp)
        passages.append(bp)
    if keep and doc.source is not None and hasattr(doc.source, "relations"):
        for r in doc.source.relations:
            out.add_relation(r)
        for bp, sp in zip(passages, doc.source.passages):
            for s in sp.sentences:
                bp.add_sentence(s)
            for r in sp.relations:
                bp.add_relation(r)
    n = 0
    for s in doc.spans:
        ann = BioCAnnotation()
        n += 1
        ann.id = s.id if s.id and not s.ours else f"loratag{n}"
        ann.infons = {"type": s.type, **{k: str(v) for k, v in s.infons.items()}}
        if s.ours:
            ann.infons.update({"annotator": "loratag", **({"run": run} if run else {})})
            if s.score is not None:
                ann.infons["score"] = f"{s.score:.4f}"
        pieces = s.fragments or ((s.start, s.end),)
        for a, b in pieces:
            ann.add_location(BioCLocation(a, b - a))
        ann.text = " ".join(doc.text[a:b] for a, b in pieces)
        home = next((bp for bp in reversed(passages) if bp.offset <= s.start), passages[0]) if passages else out
        home.add_annotation(ann)
    return out


def _collection_info():
    from bioc import BioCCollection

    c = BioCCollection()
    c.source, c.date, c.key = "loratag", date.today().strftime("%Y%m%d"), "loratag.key"
    return c


class XmlWriter:
    def __init__(self, stream: BinaryIO, keep: bool = False, run: str | None = None, **_):
        from bioc.biocxml import BioCXMLDocumentWriter

        self.keep, self.run = keep, run
        self.writer = BioCXMLDocumentWriter(stream)
        self.writer.write_collection_info(_collection_info())

    def write(self, doc: Document, tagged=None) -> None:
        self.writer.write_document(to_bioc(doc, self.keep, self.run))

    def close(self) -> None:
        self.writer.close()


class JsonWriter:
    """A BioC JSON collection, written a document at a time (the collection's header first, the list after)."""

    def __init__(self, out: TextIO, keep: bool = False, run: str | None = None, **_):
        from bioc.biocjson import toJSON

        self.out, self.keep, self.run, self.to_json, self.n = out, keep, run, toJSON, 0
        c = _collection_info()
        head = {"source": c.source, "date": c.date, "key": c.key, "infons": {}}
        out.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "documents": [\n')

    def write(self, doc: Document, tagged=None) -> None:
        sep = ",\n" if self.n else ""
        self.out.write(sep + json.dumps(self.to_json(to_bioc(doc, self.keep, self.run)), ensure_ascii=False))
        self.n += 1

    def close(self) -> None:
        self.out.write("\n]}\n")
