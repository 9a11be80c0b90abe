"""Corpus-scale prediction: many input shards -> one output shard each, written atomically, and a manifest in the
output folder, so that a rerun after a crash or `kill -9` skips the finished shards and redoes only the rest.

Two engines run the same shard function (read, tag, render, write): ``local`` in this process, ``ray`` on a Ray
cluster, where Ray Data schedules the shards over a pool of actors that each hold the merged model (loaded once per
actor). Each shard is read, tagged and written by one function, so both engines write the same bytes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .data import JSONL_EXT
from .predict import CONLL, _suffix, read_texts, render, tag, write_atomic
from .progress import bar as progress_bar

log = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"
SHARD_FORMATS = (".txt", *JSONL_EXT, *CONLL)


@dataclass(frozen=True)
class Shard:
    source: Path
    name: str  # the output file's name in the output folder

    @property
    def conll(self) -> bool:
        return _suffix(self.source) in CONLL


def find_shards(spec: str | Path) -> list[Shard]:
    """The input shards of a folder (its files of known formats, gzipped or not) or a glob pattern, sorted; each
    with the name of its output: the input's path below the folder or pattern root, ``/`` as ``__``, with a
    .jsonl (or .conll, for CoNLL input) extension."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        root, files = path, sorted(p for p in path.iterdir() if p.is_file())
        files = [p for p in files if _suffix(p) in SHARD_FORMATS]
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else None
    if not files:
        raise FileNotFoundError(f"{spec}: no input shards (files ending in {', '.join(SHARD_FORMATS)}, or .gz)")
    shards = []
    for p in files:
        stem = p.relative_to(root).as_posix().replace("/", "__").removesuffix(".gz").removesuffix(_suffix(p))
        shards.append(Shard(p, stem + (".conll" if _suffix(p) in CONLL else ".jsonl")))
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{spec}: two inputs would write the same output shard {dup!r}; rename one")
    return shards


def read_manifest(out: Path) -> dict[str, dict]:
    """Finished shards by output name. A torn last line (a kill while appending) is ignored: its shard is redone."""
    done = {}
    path = out / MANIFEST
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (out / entry["shard"]).is_file():
                done[entry["shard"]] = entry
    return done


def record(out: Path, entry: dict) -> None:
    """Append one finished shard to the manifest (after its output file is in place)."""
    path = out / MANIFEST
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        # a kill while appending can leave a torn last line: end it, so that this entry stands on its own line
        f.write(("\n" if torn else "") + json.dumps(entry, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def tag_shard(tagger, shard: Shard, out: Path) -> dict:
    """Read, tag and write one shard (atomically); its manifest entry."""
    texts = read_texts(shard.source)
    data = render(tag(tagger, texts), shard.conll)
    write_atomic(out / shard.name, data)
    return {
        "shard": shard.name,
        "input": str(shard.source),
        "documents": len(texts),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _entries(engine: str, load_kw: dict, todo: list[Shard], out: Path, actors: int, ray_address: str | None):
    """The manifest entries of the shards in ``todo``, each as its shard is written, from the chosen engine."""
    if engine == "local":
        if todo:
            from .inference import Tagger

            tagger = Tagger.load(**load_kw)
            for shard in todo:
                yield tag_shard(tagger, shard, out)
    elif engine == "ray":
        from .rayengine import run_ray

        yield from run_ray(load_kw, todo, out, actors, ray_address)
    else:
        raise ValueError(f"--engine must be local or ray, got {engine!r}")


def predict_shards(
    load_kw: dict,
    inputs: str | Path,
    out: Path,
    engine: str = "local",
    actors: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
) -> dict:
    """Tag every shard of ``inputs`` not yet in ``out``'s manifest; ``load_kw``: Tagger.load's arguments (each Ray
    actor loads its own Tagger from them). Returns a summary."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file; sharded prediction writes a folder")
    out.mkdir(parents=True, exist_ok=True)
    shards = find_shards(inputs)
    done = read_manifest(out)
    todo = [s for s in shards if s.name not in done]
    log.info("%d shards, %d done already, %d to tag (%s engine)", len(shards), len(done), len(todo), engine)
    start = time.monotonic()
    # the bar counts input bytes (known without reading a shard twice), and shows documents per second
    sizes = {s.name: s.source.stat().st_size for s in todo}
    bar = progress_bar(sum(sizes.values()), "predict", "B", progress, unit_scale=True, unit_divisor=1024)
    docs = 0
    try:
        for entry in _entries(engine, load_kw, todo, out, actors, ray_address):
            record(out, entry)
            docs += entry["documents"]
            bar.update(sizes[entry["shard"]])
            bar.set_postfix(docs=docs, docs_per_s=f"{docs / max(1e-9, time.monotonic() - start):.1f}", refresh=False)
    finally:
        bar.close()
    finished = read_manifest(out)
    return {
        "shards": len(shards),
        "skipped": len(done),
        "tagged": len(todo),
        "documents": sum(e["documents"] for e in finished.values()),
        "seconds": round(time.monotonic() - start, 2),
        "output": str(out),
    }
