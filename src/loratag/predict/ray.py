"""`loratag predict --engine ray`: the shards of shards.py on a Ray cluster (the ``ray`` extra, imported only here).

Ray Data schedules one task per shard over a pool of actors; each actor loads its Tagger once (not per batch) from
a TaggerSpec and runs shards.tag_shard, the same function as the local engine, so the output bytes are the same. A
killed actor is restarted and its shard retried (writes are atomic and a retried shard writes the same bytes);
the driver records each shard in the manifest once, as its result comes back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path

from .shards import Shard, ShardOptions, ShardRecord, TaggerSpec, tag_shard


class ShardTagger:
    """A Ray Data actor: holds one Tagger, tags whole shards."""

    def __init__(self, spec: TaggerSpec, out: str, options: ShardOptions | None = None):
        self.tagger = spec.load()
        self.out, self.options = Path(out), options

    def __call__(self, batch: dict) -> dict:
        records = [
            asdict(tag_shard(self.tagger, Shard(Path(str(src)), str(name)), self.out, self.options))
            for src, name in zip(batch["source"], batch["name"])
        ]
        return {f.name: [r[f.name] for r in records] for f in fields(ShardRecord)}


def ensure_ray(address: str | None, num_cpus: int | None = None):
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'loratag[ray]'") from None
    if not ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kw["num_cpus"] = num_cpus or os.cpu_count()
        ray.init(address=address, **kw)
    return ray


def ray_engine(actors: int = 1, address: str | None = None):
    """A shards.Engine that tags on the cluster at ``address`` (None: a local one) with ``actors`` actors."""

    def engine(
        spec: TaggerSpec, shards: list[Shard], out: Path, options: ShardOptions | None = None
    ) -> Iterator[ShardRecord]:
        """Yields each shard's record once, in the order they finish."""
        if not shards:
            return
        ray = ensure_ray(address)
        cpus = ray.cluster_resources().get("CPU", 1)
        per_actor = max(1, int(cpus // max(1, actors)))
        rows = [{"source": str(s.source), "name": s.name} for s in shards]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        tagged = ds.map_batches(
            ShardTagger,
            fn_constructor_kwargs={"spec": spec, "out": str(out), "options": options},
            batch_size=1,
            concurrency=actors,  # Ray Data restarts an actor that dies and retries its shard (its default, kept)
            num_cpus=per_actor,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(per_actor)}},
        )
        seen = set()
        for row in tagged.iter_rows():
            if row["shard"] in seen:
                continue
            seen.add(row["shard"])
            yield ShardRecord.from_dict(row)

    return engine
