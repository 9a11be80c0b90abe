"""Texts with character spans in JSON: Label Studio's JSON export (and predictions to import), Prodigy's and
doccano's JSON Lines, and loratag's own predictions (``{"text", "entities"}``), one shape each, all plain json."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from ..data import DataError, json_records, open_binary
from .model import Document, Span

log = logging.getLogger("loratag")

# ---- JSON Lines: Prodigy {"text", "spans": [{start, end, label}]}, doccano {"text", "label": [[s, e, T]]} (or
# "entities": [{start_offset, end_offset, label}]), loratag {"text", "entities": [{start, end, label}]}, {"text"}


def _record_id(rec: dict) -> str:
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    for v in (rec.get("id"), meta.get("id"), meta.get("pmid")):
        if v is not None:
            return str(v)
    return ""


def _span(item, where: str) -> tuple[int, int, str, float | None]:
    if isinstance(item, list) and len(item) == 3:
        start, end, kind, score = *item, None
    elif isinstance(item, dict):
        start = item.get("start", item.get("start_offset"))
        end = item.get("end", item.get("end_offset"))
        kind, score = item.get("label"), item.get("score")
    else:
        start = end = kind = score = None
    if not isinstance(start, int) or not isinstance(end, int) or not isinstance(kind, str):
        raise DataError(
            f'{where}: span {item!r}: expected {{"start": int, "end": int, "label": str}} or [start, end, label]'
        )
    return start, end, kind, score


def read_jsonl(lines: Iterable[str], path: str) -> Iterator[Document]:
    for rec, where in json_records(lines, path, "one object per line"):
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DataError(f'{where}: expected an object with a string field "text"')
        items = next((rec[k] for k in ("spans", "label", "entities") if isinstance(rec.get(k), list)), [])
        spans = []
        for item in items:
            start, end, kind, score = _span(item, where)
            text = item.get("text") if isinstance(item, dict) else None
            spans.append(Span(start, end, kind, text, None, (), {}, score))
        yield Document.plain(_record_id(rec), rec["text"], spans, where=where, source=rec)


class JsonlWriter:
    """loratag's JSON Lines: ``{"id"?, "text", "entities": [{text, label, start, end, score}]}`` a document a line
    (the id only where the input had one)."""

    def __init__(self, out: TextIO, **_):
        self.out = out

    def write(self, doc: Document, tagged=None) -> None:
        ents = [
            {"text": doc.text[s.start : s.end], "label": s.type, "start": s.start, "end": s.end, "score": s.score}
            for s in doc.spans
        ]
        rec = {"id": doc.id} if doc.id else {}
        self.out.write(json.dumps({**rec, "text": doc.text, "entities": ents}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        pass


class ProdigyWriter:
    """Prodigy's (and doccano's importer's) JSON Lines: ``{"text", "spans": [{start, end, label}], "meta": {id}}``."""

    def __init__(self, out: TextIO, **_):
        self.out = out

    def write(self, doc: Document, tagged=None) -> None:
        spans = [{"start": s.start, "end": s.end, "label": s.type} for s in doc.spans]
        rec = {"text": doc.text, "spans": spans, **({"meta": {"id": doc.id}} if doc.id else {})}
        self.out.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def close(self) -> None:
        pass


# ---- Label Studio: a JSON list of tasks {"id", "data": {"text"}, "annotations": [{"result": [...]}], ...}

FROM_NAME, TO_NAME = "label", "text"  # the names in Label Studio's "Named Entity Recognition" template


def _task_text(task: dict, where: str) -> tuple[str, str]:
    data = task.get("data")
    if not isinstance(data, dict):
        raise DataError(f'{where}: expected a task with "data": {{"text": "..."}}')
    if isinstance(data.get("text"), str):
        return "text", data["text"]
    strings = [k for k, v in data.items() if isinstance(v, str)]
    if len(strings) != 1:
        raise DataError(f'{where}: "data" has no "text" field and {len(strings)} string fields; expected one text')
    return strings[0], data[strings[0]]


def read_labelstudio(path: Path) -> Iterator[Document]:
    """Label Studio's JSON export (a list of tasks), streamed task by task with ijson."""
    import ijson

    with open_binary(path) as f:
        try:
            first = f.read(1)
            while first and first.isspace():
                first = f.read(1)
            f.seek(0)
            if first != b"[":
                raise DataError(f'{path}: task 0: expected a task with "data" in a JSON list (Label Studio\'s export)')
            several = 0
            for i, task in enumerate(ijson.items(f, "item", use_float=True)):
                done = (
                    [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
                    if isinstance(task, dict)
                    else []
                )
                several += len(done) > 1
                yield _task(task, i, path)
            if several:
                log.warning(
                    "%s: %d tasks have several annotations; the first one not cancelled of each is read", path, several
                )
        except ijson.JSONError as e:
            raise DataError(f"{path}: not valid JSON ({e}); expected Label Studio's JSON export") from None


def _done(task: dict) -> list:
    return [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]


def _task(task, i: int, path: Path) -> Document:
    where = f"{path}: task {task.get('id', i) if isinstance(task, dict) else i}"
    if not isinstance(task, dict):
        raise DataError(f"{where}: expected an object")
    _, body = _task_text(task, where)
    done = _done(task)
    spans = []
    for r in (done[0].get("result") or []) if done else []:
        value = r.get("value") or {}
        if r.get("type") not in ("labels", None) or "start" not in value:
            continue
        labels = value.get("labels") or []
        if len(labels) != 1:
            raise DataError(f"{where}: region {r.get('id')!r} has {len(labels)} labels; expected one")
        spans.append(Span(value["start"], value["end"], labels[0], value.get("text"), r.get("id")))
    rid = task.get("id", (task.get("data") or {}).get("id", ""))
    return Document.plain(str(rid) if rid is not None else "", body, spans, where=where, source=task)


class LabelStudioWriter:
    """Tasks to import into Label Studio: loratag's mentions as ``predictions`` (pre-annotations, the run as
    ``model_version``), any other spans of the document (its own, kept) as an annotation. A document read from
    Label Studio keeps its task's id and data. Written as a JSON list, a task at a time."""

    def __init__(self, out: TextIO, run: str | None = None, **_):
        self.out, self.run, self.n = out, run, 0
        out.write("[\n")

    @staticmethod
    def _result(doc: Document, spans: list[Span], prefix: str) -> list[dict]:
        out = []
        for i, s in enumerate(spans):
            value = {"start": s.start, "end": s.end, "text": doc.text[s.start : s.end], "labels": [s.type]}
            region = {"id": s.id or f"{prefix}{i + 1}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "labels"}
            out.append({**region, "value": value, **({"score": s.score} if s.score is not None else {})})
        return out

    def write(self, doc: Document, tagged=None) -> None:
        src = doc.source if isinstance(doc.source, dict) and isinstance(doc.source.get("data"), dict) else None
        task = {"data": dict(src["data"]) if src else {TO_NAME: doc.text}}
        if src and "id" in src:
            task["id"] = src["id"]
        elif doc.id:
            task["data"]["id"] = doc.id
        theirs = [s for s in doc.spans if not s.ours]
        if theirs:
            task["annotations"] = [{"result": self._result(doc, theirs, "r")}]
        ours = [s for s in doc.spans if s.ours]
        prediction = {"model_version": f"loratag {self.run}" if self.run else "loratag"}
        prediction["result"] = self._result(doc, [replace(s, id=None) for s in ours], "loratag")
        if ours:
            prediction["score"] = round(sum(s.score or 0.0 for s in ours) / len(ours), 4)
        if ours or not theirs:
            task["predictions"] = [prediction]
        self.out.write((",\n" if self.n else "") + json.dumps(task, ensure_ascii=False))
        self.n += 1

    def close(self) -> None:
        self.out.write("\n]\n")
