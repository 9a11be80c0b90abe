"""Corpus-scale prediction: many input shards -> one output shard each, written atomically, and a manifest in the
output folder, so that a rerun after a crash or `kill -9` skips the finished shards and redoes only the rest.

An engine runs the same shard function (read, tag, render, write) over the shards to do: ``local_engine`` in this
process, or ray.py's on a Ray cluster, where actors each load a Tagger once from a ``TaggerSpec``. Each shard is
read, tagged and written by one function, so every engine writes the same bytes. The engine is passed in by the
caller: this module imports no engine.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..documents import name_suffix
from ..labels import LabelSet
from ..progress import bar as progress_bar
from ..rundir import append_line, write_atomic
from .formats import predict, read_input, suffix

log = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"
SHARD_FORMATS = (".txt", ".json", ".jsonl", ".conll", ".tsv", ".xml", ".pubtator", ".spacy")
CONLL = (".conll", ".tsv")
EXTENSIONS = {"jsonl": ".jsonl", "conll": ".conll", "bioc-xml": ".bioc.xml", "bioc-json": ".bioc.json",
              "pubtator": ".pubtator", "spacy": ".spacy", "labelstudio": ".labelstudio.json",
              "prodigy": ".prodigy.jsonl"}  # fmt: skip


@dataclass(frozen=True)
class ShardOptions:
    """What each shard is written as: ``format`` (default jsonl, conll for CoNLL input), the input format where
    detection cannot tell, ``keep`` the input's own annotations, and the run's name to mark ours with."""

    format: str | None = None
    input_format: str | None = None
    keep: bool = False
    run: str | None = None


@dataclass(frozen=True)
class TaggerSpec:
    """How to load the Tagger (Tagger.load's arguments): a small value each Ray actor receives and loads from."""

    path: Path
    labels: LabelSet | None = None
    device: str | None = None
    merge: bool = True
    quantize: str | None = None
    precision: str = "auto"
    batch_size: int = 64
    base: str | None = None
    decode: str | None = None

    def load(self):
        from ..tagger import Tagger

        return Tagger.load(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: one line of the manifest."""

    shard: str  # the output file's name in the output folder
    input: str
    documents: int
    bytes: int
    sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> ShardRecord:
        """From a manifest line, or a row Ray sends back (whose numbers may be numpy's)."""
        return cls(str(d["shard"]), str(d["input"]), int(d["documents"]), int(d["bytes"]), str(d["sha256"]))


Engine = Callable[..., Iterator[ShardRecord]]  # (spec, shards to do, out, options) -> records


@dataclass(frozen=True)
class Shard:
    source: Path
    name: str  # the output file's name in the output folder


def find_shards(spec: str | Path, options: ShardOptions | None = None) -> list[Shard]:
    """The input shards of a folder (its files of known formats, gzipped or not) or a glob pattern, sorted; each
    with the name of its output: the input's path below the folder or pattern root, ``/`` as ``__``, with the output
    format's extension (.jsonl by default, .conll for CoNLL input)."""
    options = options or ShardOptions()
    if options.format == "brat":
        raise ValueError("--format brat writes one folder; sharded prediction writes a file per shard: choose another")
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        root, files = path, sorted(p for p in path.iterdir() if p.is_file())
        files = [p for p in files if suffix(p) in SHARD_FORMATS]
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else None
    if not files:
        raise FileNotFoundError(f"{spec}: no input shards (files ending in {', '.join(SHARD_FORMATS)}, or .gz)")
    shards = []
    for p in files:
        rel = p.relative_to(root).as_posix().replace("/", "__").removesuffix(".gz")
        stem = rel[: len(rel) - len(name_suffix(p))]  # the whole format suffix: a.bioc.xml -> a
        fmt = options.format or ("conll" if suffix(p) in CONLL else "jsonl")
        shards.append(Shard(p, stem + EXTENSIONS[fmt]))
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{spec}: two inputs would write the same output shard {dup!r}; rename one")
    return shards


def read_manifest(out: Path) -> dict[str, ShardRecord]:
    """Finished shards by output name. A torn last line (a kill while appending) is ignored: its shard is redone."""
    done = {}
    path = out / MANIFEST
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = ShardRecord.from_dict(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if (out / entry.shard).is_file():
                done[entry.shard] = entry
    return done


def tag_shard(tagger, shard: Shard, out: Path, options: ShardOptions | None = None) -> ShardRecord:
    """Read, tag and write one shard (atomically); its manifest record."""
    import io

    options = options or ShardOptions()
    buf = io.BytesIO()
    source = read_input(shard.source, options.input_format)
    n = predict(tagger, source, out / shard.name, None, keep=options.keep, run=options.run, stream=buf)
    data = buf.getvalue()
    write_atomic(out / shard.name, data)
    return ShardRecord(shard.name, str(shard.source), n, len(data), hashlib.sha256(data).hexdigest())


def local_engine(spec: TaggerSpec, todo: list[Shard], out: Path, options: ShardOptions | None = None):
    """The shards in this process, one Tagger for all (loaded only if there is something to do)."""
    if todo:
        tagger = spec.load()
        for shard in todo:
            yield tag_shard(tagger, shard, out, options)


def predict_shards(
    spec: TaggerSpec,
    inputs: str | Path,
    out: Path,
    engine: Engine = local_engine,
    progress: bool = True,
    options: ShardOptions | None = None,
) -> dict:
    """Tag every shard of ``inputs`` not yet in ``out``'s manifest with ``engine``. Returns a summary."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file; sharded prediction writes a folder")
    out.mkdir(parents=True, exist_ok=True)
    shards = find_shards(inputs, options)
    done = read_manifest(out)
    todo = [s for s in shards if s.name not in done]
    log.info("%d shards, %d done already, %d to tag", len(shards), len(done), len(todo))
    start = time.monotonic()
    # the bar counts input bytes (known without reading a shard twice), and shows documents per second
    sizes = {s.name: s.source.stat().st_size for s in todo}
    bar = progress_bar(sum(sizes.values()), "predict", "B", progress, unit_scale=True, unit_divisor=1024)
    docs = 0
    try:
        for entry in engine(spec, todo, out, options):
            append_line(out / MANIFEST, entry.to_json())  # after its output file is in place
            docs += entry.documents
            bar.update(sizes[entry.shard])
            bar.set_postfix(docs=docs, docs_per_s=f"{docs / max(1e-9, time.monotonic() - start):.1f}", refresh=False)
    finally:
        bar.close()
    finished = read_manifest(out)
    return {
        "shards": len(shards),
        "skipped": len(done),
        "tagged": len(todo),
        "documents": sum(e.documents for e in finished.values()),
        "seconds": round(time.monotonic() - start, 2),
        "output": str(out),
    }
