"""Reading token-classification corpora: tner JSON Lines, CoNLL columns, hub datasets.

Every error names the file and line (or record) and what was expected.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .labels import LabelSet, repair_iob2

log = logging.getLogger(__name__)

SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev", "devel"),
    "test": ("test",),
}
JSONL_EXT = (".json", ".jsonl")
CONLL_EXT = (".conll", ".tsv", ".txt")
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class DataError(ValueError):
    """Bad input data; the message names the file, the line and what was expected."""


@dataclass(frozen=True)
class Sentence:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    doc: str | None = field(default=None, compare=False)
    """The document it belongs to, where the source says (documents, documents.tsv, -DOCSTART-)."""
    offsets: tuple[tuple[int, int], ...] | None = field(default=None, compare=False, repr=False)
    """Its words' character offsets into the document's text, for sentences read from documents."""


@dataclass(frozen=True)
class Corpus:
    splits: dict[str, list[Sentence]]
    labels: LabelSet
    source: str
    labels_from: str | None = None
    """Where the label order comes from (a label.json, a dataset's ClassLabel names); None: sorted from the
    tags seen, an order no model was trained with unless loratag trained it (and saved it in labels.json)."""
    documents: dict[str, list] = field(default_factory=dict)
    """Per split read from documents: its documents with their gold mentions (character-level scores)."""
    report: dict = field(default_factory=dict)
    """Per split: file, format, counts and every repair; how validation was made. Logged and kept in config.json."""


def read_text(path: Path) -> str:
    """A UTF-8 file's text as it is (offsets into it stay valid); other encodings fail naming file:line."""
    return decode_utf8(path.read_bytes(), path)


def decode_utf8(raw: bytes, path: Path) -> str:
    """``raw`` (the bytes of ``path``, perhaps gunzipped) as UTF-8 text; other encodings fail naming file:line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        bad = f"byte {raw[e.start]:#04x} at offset {e.start}"
        raise DataError(f"{path}:{line}: not UTF-8 ({bad}); save the file as UTF-8") from None


def open_binary(path: Path) -> BinaryIO:
    """A file's bytes, gunzipped for a ``.gz`` name."""
    try:
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def lines_of(path: Path) -> Iterator[str]:
    """A text file's lines (gunzipped for ``.gz``) as UTF-8, one at a time, line ends kept; a bad byte names the
    file and its line."""
    pos = 0
    try:
        with open_binary(path) as f:
            for n, raw in enumerate(f, 1):  # decoded line by line: a bad byte is known to its line
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = f"byte {raw[e.start]:#04x} at offset {pos + e.start}"
                    raise DataError(f"{path}:{n}: not UTF-8 ({bad}); save the file as UTF-8") from None
                pos += len(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _read_lines(path: Path) -> list[str]:
    return [line.rstrip("\r\n") for line in lines_of(path)]


def json_records(lines: Iterable[str], path: Path | str, expected: str) -> Iterator[tuple[Any, str]]:
    """``(record, "file:line")`` of each non-blank JSON Lines line; a line that is not JSON stops naming its place
    and ``expected``."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); expected {expected}") from None


def read_label_json(folder: Path | None) -> tuple[LabelSet | None, str | None]:
    """The label order of ``folder/label.json`` (label -> id) and where it came from; ``(None, None)`` without one."""
    if folder is None or not (folder / "label.json").is_file():
        return None, None
    path = folder / "label.json"
    try:
        return LabelSet.from_mapping(json.loads(path.read_text(encoding="utf-8"))), str(path)
    except (json.JSONDecodeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: expected a JSON object label -> id ({e})") from None


def read_jsonl(path: Path) -> list[tuple[list[str], list, str]]:
    """Records ``(tokens, raw_tags, where)`` of a tner JSON Lines file; tags may be ids or strings."""
    out = []
    for rec, where in json_records(lines_of(path), path, "one object per line"):
        if not isinstance(rec, dict) or "tokens" not in rec or "tags" not in rec:
            raise DataError(f'{where}: expected an object {{"tokens": [...], "tags": [...]}}')
        tokens, tags = rec["tokens"], rec["tags"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f"{where}: 'tokens' must be a list of strings")
        if not isinstance(tags, list):
            raise DataError(f"{where}: 'tags' must be a list")
        if len(tokens) != len(tags):
            raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags; expected one tag per token")
        out.append((tokens, tags, where))
    return out


def read_conll(path: Path) -> list[tuple[list[str], list, str]]:
    """Records of a CoNLL column file: token first, tag last, a blank line between sentences; a ``-DOCSTART-`` line
    begins a document (the record's fourth item numbers them)."""
    out, tokens, tags, where, width, doc = [], [], [], None, None, 0
    for n, line in enumerate([*_read_lines(path), ""], 1):
        cols = line.split()
        if not cols:
            if tokens:
                out.append((tokens, tags, where, f"doc{doc}" if doc else None))
            tokens, tags, where = [], [], None
            continue
        if cols[0] == "-DOCSTART-":
            doc += 1
            continue
        if width is None:
            if len(cols) < 2:
                raise DataError(f"{path}:{n}: expected at least 2 columns (token ... tag), got {len(cols)}: {line!r}")
            width = len(cols)
        if len(cols) != width:
            raise DataError(f"{path}:{n}: expected {width} columns like the first line, got {len(cols)}: {line!r}")
        tokens.append(cols[0])
        tags.append(cols[-1])
        where = where or f"{path}:{n}"
    return out


def _find_split(folder: Path, split: str) -> Path | None:
    for name in SPLIT_NAMES[split]:
        for ext in JSONL_EXT + CONLL_EXT:
            p = folder / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def _to_sentences(records: list, labels: LabelSet | None, split: str, path: Path) -> list[Sentence]:
    names = labels.labels if labels else None
    known = set(names) if names else None
    sentences, repaired = [], 0
    for tokens, raw, where, *doc in records:
        tags = []
        for i, t in enumerate(raw):
            if isinstance(t, bool) or not isinstance(t, (int, str)):
                raise DataError(f"{where}: tag {i} is {t!r}; expected a label or a label id")
            if isinstance(t, int):
                if names is None:
                    raise DataError(f"{where}: tags are ids but there is no label.json beside {path.name}")
                if not 0 <= t < len(names):
                    raise DataError(f"{where}: tag id {t} out of range; expected 0..{len(names) - 1} (label.json)")
                t = names[t]
            elif known is not None and t not in known:
                raise DataError(f"{where}: tag {t!r} is not in the label set; expected one of {', '.join(names)}")
            tags.append(t)
        if not tokens:
            continue
        fixed_tags, fixed = repair_iob2(tags)
        repaired += fixed
        sentences.append(Sentence(tuple(tokens), tuple(fixed_tags), doc[0] if doc else None))
    if not sentences:
        raise DataError(f"{path}: the {split} split is empty; expected at least one sentence")
    if repaired:
        log.warning("%s: repaired %d I- tags with no opening B- (read as B-, as conlleval does)", path, repaired)
    return sentences


def load_folder(folder: str | Path, labels: LabelSet | None = None) -> Corpus:
    """A local folder with train / validation (or dev) / test files and optionally label.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data directory not found: {folder}")
    labels, labels_from = (labels, "--labels") if labels is not None else read_label_json(folder)
    paths = {s: _find_split(folder, s) for s in SPLIT_NAMES}
    for split in ("train", "validation"):
        if paths[split] is None:
            names = "/".join(SPLIT_NAMES[split])
            raise FileNotFoundError(
                f"{folder}: no {split} file; expected {names} with extension {', '.join(JSONL_EXT + CONLL_EXT)}"
            )
    records = {}
    for split, p in paths.items():
        if p is not None:
            records[split] = read_jsonl(p) if p.suffix in JSONL_EXT else read_conll(p)
    if labels is None:
        seen = [t for recs in records.values() for _, tags, *_ in recs for t in tags if isinstance(t, str)]
        labels = LabelSet.from_tags(seen)
    splits = {s: _to_sentences(recs, labels, s, paths[s]) for s, recs in records.items()}
    return Corpus(splits, labels, str(folder), labels_from)


def from_hf_dataset(dataset_dict, source: str) -> Corpus:
    """A ``datasets.DatasetDict`` with ``tokens`` and ``tags``/``ner_tags`` columns (ClassLabel ids)."""
    first = next(iter(dataset_dict.values()))
    tag_col = next((c for c in ("tags", "ner_tags") if c in first.column_names), None)
    if "tokens" not in first.column_names or tag_col is None:
        raise DataError(f"{source}: expected columns tokens and tags (or ner_tags), got {first.column_names}")
    feature = first.features[tag_col]
    names = getattr(getattr(feature, "feature", None), "names", None)
    labels = LabelSet(tuple(names)) if names else None
    labels_from = f"{source}: ClassLabel names of column {tag_col}" if names else None
    records = {}
    for split, ds in dataset_dict.items():
        key = next((k for k, v in SPLIT_NAMES.items() if split in v), None)
        if key:
            records[key] = [(r["tokens"], r[tag_col], f"{source}[{split}] record {i}") for i, r in enumerate(ds)]
    if labels is None:
        labels = LabelSet.from_tags(t for recs in records.values() for _, tags, _ in recs for t in tags)
    missing = [s for s in ("train", "validation") if s not in records]
    if missing:
        raise DataError(f"{source}: no {' or '.join(missing)} split; found {list(dataset_dict)}")
    splits = {s: _to_sentences(r, labels, s, Path(source)) for s, r in records.items()}
    return Corpus(splits, labels, source, labels_from)


def load_hub_snapshot(folder: Path, source: str) -> Corpus:
    """A downloaded dataset repository. tner repositories keep JSON Lines under ``dataset/`` next to a
    loading script that current ``datasets`` no longer runs, so we read those files ourselves."""
    for sub in (folder / "dataset", folder / "data", folder):
        if _find_split(sub, "train"):
            return load_folder(sub)
    import datasets  # parquet / csv repositories: the datasets library reads them

    return from_hf_dataset(datasets.load_dataset(str(folder)), source)


def load_corpus(spec: str, download=None) -> Corpus:
    """A local folder, or a hub dataset name (fetched with huggingface_hub; ``download`` is for tests)."""
    if not spec:
        raise ValueError("--data is required: a hub dataset name or a local folder")
    path = Path(spec).expanduser()
    if path.exists() or not HUB_NAME.match(spec):
        return load_folder(path)
    if download is None:
        from huggingface_hub import snapshot_download

        def download(repo_id: str) -> str:
            return snapshot_download(repo_id=repo_id, repo_type="dataset")

    try:
        folder = Path(download(spec))
    except Exception as e:  # offline, unknown repo, gated: one clear line instead of a traceback
        raise FileNotFoundError(
            f"could not fetch dataset {spec!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "offline, pass a local folder with --data"
        ) from None
    return load_hub_snapshot(folder, spec)
