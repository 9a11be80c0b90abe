"""A training corpus from what the user has: a hub dataset, a folder, or one file per split, each in any format
loratag reads (sentence files through data.py, documents through documents/). Documents become tagged sentences
(documents/align.py), every repair counted; sentences are grouped into documents where the source says so
(documents.tsv, -DOCSTART-); a missing validation split is set aside from the training documents.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

from .config import CorpusSettings
from .data import (
    HUB_NAME,
    Corpus,
    DataError,
    Sentence,
    _to_sentences,
    load_corpus,
    read_conll,
    read_jsonl,
    read_label_json,
)
from .labels import LabelSet

log = logging.getLogger("loratag")
SPLITS = ("train", "validation", "test")
_SPLIT_WORDS = {"train": re.compile(r"train"), "validation": re.compile(r"valid|dev"), "test": re.compile(r"test")}
_DATA_SUFFIXES = (".json", ".jsonl", ".conll", ".tsv", ".txt", ".xml", ".pubtator", ".spacy", ".iob2", ".iob")


def find_splits(folder: Path) -> dict[str, Path]:
    """The split files of a folder, by their names (``train.json``, ``NCBItrainset_corpus.txt``, ``devel.bioc.xml``,
    a brat folder ``dev/``); two candidates for one split is an error, never a guess."""
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for p in sorted(folder.iterdir()):
        name = p.name.lower().removesuffix(".gz")
        is_data = p.is_dir() and any(p.glob("*.ann")) or p.is_file() and name.endswith(_DATA_SUFFIXES)
        if not is_data or name in ("label.json", "documents.tsv"):
            continue
        hits = [s for s, pat in _SPLIT_WORDS.items() if pat.search(name)]
        if len(hits) == 1:
            found[hits[0]].append(p)
    out = {}
    for split, paths in found.items():
        exact = [p for p in paths if p.name.lower().split(".")[0] in ("train", "validation", "valid", "dev", "test")]
        if len(paths) > 1 and len(exact) != 1:
            names = ", ".join(p.name for p in paths)
            raise DataError(f"{folder}: {len(paths)} files could be the {split} split ({names}); pass --{split} FILE")
        if paths:
            out[split] = exact[0] if len(paths) > 1 else paths[0]
    return out


def _documents_tsv(folder: Path | None) -> dict[str, list[tuple[str, int]]]:
    """``documents.tsv`` (split, doc_id, sentences): which consecutive sentences of each split form a document."""
    if folder is None or not (folder / "documents.tsv").is_file():
        return {}
    out: dict[str, list[tuple[str, int]]] = {}
    with open(folder / "documents.tsv", encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            try:
                out.setdefault(row["split"], []).append((row["doc_id"], int(row["sentences"])))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{folder / 'documents.tsv'}:{n}: expected split<TAB>doc_id<TAB>sentences") from None
    return out


def _group(sentences: list[Sentence], docs: list[tuple[str, int]], where: str) -> list[Sentence]:
    if sum(n for _, n in docs) != len(sentences):
        log.warning("%s: documents.tsv counts %d sentences, the file %d: documents not used", where,
                    sum(n for _, n in docs), len(sentences))  # fmt: skip
        return sentences
    out, i = [], 0
    for doc_id, n in docs:
        out += [replace(s, doc=doc_id) for s in sentences[i : i + n]]
        i += n
    return out


def _retag(sentences: list[Sentence], policy, repairs: Counter) -> list[Sentence]:
    """--type-map and --types on sentence files' IOB2 tags."""
    out = []
    for s in sentences:
        tags = []
        for t in s.tags:
            if t == "O":
                tags.append(t)
                continue
            prefix, kind = t[:2], t[2:]
            new = policy.type_map.get(kind, kind)
            if new != kind and prefix == "B-":
                repairs[f"type {kind} read as {new} (--type-map)"] += 1
            if policy.types is not None and new not in policy.types:
                repairs[f"type {new} left out (--types)"] += prefix == "B-"
                tags.append("O")
            else:
                tags.append(prefix + new)
        out.append(replace(s, tags=tuple(tags)))
    return out


def carve(sentences: list[Sentence], fraction: float, seed: int) -> tuple[list[Sentence], list[Sentence], int]:
    """Whole documents (a sentence without one is its own) set aside: ``(train, validation, documents set aside)``."""
    keys = [s.doc if s.doc is not None else f"#{i}" for i, s in enumerate(sentences)]
    docs = list(dict.fromkeys(keys))
    if len(docs) < 2:
        raise DataError("no validation split and only one training document to take one from; pass --validation")
    random.Random(seed).shuffle(docs)
    held = set(docs[: max(1, round(fraction * len(docs)))])
    train = [s for s, k in zip(sentences, keys) if k not in held]
    val = [s for s, k in zip(sentences, keys) if k in held]
    return train, val, len(held)


def load(
    spec: str,
    settings: CorpusSettings | None = None,
    seed: int = 42,
    labels: LabelSet | None = None,
    download=None,
    only: str | None = None,
) -> Corpus:
    """The corpus of ``--data`` and ``--train/--validation/--test`` as ``settings`` says (``seed``: the validation
    split set aside when there is none). ``labels``: the label order to use (``--labels``). ``only``: read only that
    split (evaluation), and the training split only to set validation aside from it."""
    from .documents import SENTENCE_FORMATS, detect, read_documents
    from .documents.align import SpanPolicy, split_of

    settings = settings or CorpusSettings()
    policy = SpanPolicy(settings.types, SpanPolicy.parse_map(settings.type_map), settings.overlaps,
                        settings.discontinuous)  # fmt: skip
    explicit = {s: Path(v).expanduser() for s in SPLITS if (v := getattr(settings, s))}
    folder = Path(spec).expanduser() if spec else None
    if spec and not explicit and not folder.exists() and HUB_NAME.match(spec):
        corpus = load_corpus(spec, download)  # a hub dataset: sentences with their ClassLabel names
        return _finish(corpus.splits, corpus.labels, corpus.labels_from, {}, {}, policy, settings, seed, spec)
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"data directory not found: {folder}")
    paths = {**(find_splits(folder) if folder else {}), **explicit}
    if only is not None and only in paths:
        paths = {only: paths[only]}
    elif only is not None and only != "validation":
        raise FileNotFoundError(f"{folder or 'the data'}: no {only} split; pass --{only} FILE")
    if "train" not in paths and only is None or not paths:
        raise FileNotFoundError(
            f"{folder or '--train'}: no training data; expected --train FILE, or a file or brat folder in --data "
            "whose name says train (train.json, NCBItrainset_corpus.txt, train.bioc.xml, ...)"
        )
    for split, p in paths.items():
        if not p.exists():
            raise FileNotFoundError(f"--{split} {p}: not found")
    known, labels_from = (labels, "--labels") if labels is not None else read_label_json(folder)
    grouping = _documents_tsv(folder)
    sentences, documents, report = {}, {}, {}
    for split, p in paths.items():
        fmt = settings.data_format or detect(p)
        fmt = "conll" if fmt == "text" else fmt  # a .txt training file that is not PubTator: CoNLL columns
        repairs: Counter = Counter()
        if fmt in SENTENCE_FORMATS:
            records = read_jsonl(p) if fmt == "tner" else read_conll(p)
            sentences[split] = _to_sentences(records, known, split, p)
            if split in grouping and not any(s.doc for s in sentences[split]):
                sentences[split] = _group(sentences[split], grouping[split], str(p))
            n_docs = len({s.doc for s in sentences[split] if s.doc is not None})
        else:
            got = split_of(read_documents(p, fmt), policy, repairs)
            if not got.sentences:
                raise DataError(f"{p}: the {split} split has no text; expected at least one document with text")
            sentences[split], documents[split] = got.sentences, got.documents
            n_docs = len(got.documents)
        report[split] = {"file": str(p), "format": fmt, "documents": n_docs, "repairs": dict(repairs)}
    return _finish(sentences, known, labels_from, documents, report, policy, settings, seed, spec)


def _finish(sentences, labels, labels_from, documents, report, policy, settings, seed, source) -> Corpus:
    changes = policy.types is not None or bool(policy.type_map)
    for split in list(sentences):
        if changes and split not in documents:
            repairs: Counter = Counter()
            sentences[split] = _retag(sentences[split], policy, repairs)
            report.setdefault(split, {}).setdefault("repairs", {}).update(repairs)
    if "validation" not in sentences and "train" in sentences:
        train, val, n = carve(sentences["train"], settings.validation_fraction, seed)
        sentences["train"], sentences["validation"] = train, val
        if "train" in documents:
            held = {s.doc for s in val}
            documents["validation"] = [d for d in documents["train"] if d.id in held]
            documents["train"] = [d for d in documents["train"] if d.id not in held]
        report["train"]["documents"] -= n
        report["validation"] = {"set_aside_from": "train", "fraction": settings.validation_fraction, "seed": seed,
                                "documents": n}  # fmt: skip
        log.info("no validation split: %d training documents (%.0f%%, seed %d) set aside for validation", n,
                 100 * settings.validation_fraction, seed)  # fmt: skip
    tags = [t for split in sentences.values() for s in split for t in s.tags]
    if labels is None or changes:
        labels, labels_from = LabelSet.from_tags(tags), None
    else:
        unknown = sorted(set(tags) - set(labels.labels))
        if unknown:
            raise DataError(f"{source}: tags {unknown} are not in the label set ({labels_from})")
    for split, ss in sentences.items():
        if not ss:
            raise DataError(f"{source}: the {split} split is empty; expected at least one sentence")
        entry = report.setdefault(split, {})
        entry["sentences"] = len(ss)
        fixes = entry.get("repairs") or {}
        line = f"{split}: {len(ss)} sentences" + (f" ({entry['format']}: {entry['file']})" if "file" in entry else "")
        log.info(line + ("; " + "; ".join(f"{k}: {v}" for k, v in fixes.items()) if fixes else ""))
    files = [r["file"] for r in report.values() if "file" in r]
    return Corpus(sentences, labels, str(source or files[0]), labels_from, documents, report)
