"""Sharded prediction: the BioNLP2004 test text written as N shards, tagged by the local engine and by the Ray engine
with 1 and 2 actors (a local Ray cluster). Sentences/s, peak memory, the Ray engine's start-up time, and whether
the outputs are byte-identical. Prints one JSON line.

    python benchmarks/bench_shards.py --run runs/bionlp --shards 8

Each arm runs alone in a fresh process. Peak memory: the arm's process and, for Ray, every process of the cluster it
started (raylet, GCS, workers), summed at their peaks as sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit  # noqa: E402


def _tree_rss_mib(root: int) -> float:
    """Resident memory of a process and all its descendants, now (Ray starts its processes as children)."""
    parents, rss = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            for line in open(f"/proc/{d}/status"):
                if line.startswith("VmRSS:"):
                    rss[int(d)] = int(line.split()[1]) / 1024
        except OSError:
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(p, 0.0) for p in tree)


def arm(a) -> dict:
    """One engine, in this process: tag every shard, time it."""
    t0 = time.perf_counter()
    from loratag.predict.shards import TaggerSpec, local_engine, predict_shards

    run = local_engine
    if a.arm.startswith("ray"):
        from loratag.predict.ray import ensure_ray, ray_engine

        ensure_ray(None, num_cpus=os.cpu_count())
    started = time.perf_counter() - t0
    engine, actors = ("ray", int(a.arm[3:])) if a.arm.startswith("ray") else ("local", 1)
    if engine == "ray":
        run = ray_engine(actors)
    t = time.perf_counter()
    spec = TaggerSpec(Path(a.run), precision=a.precision)
    summary = predict_shards(spec, a.inputs, Path(a.out), run, progress=False)
    seconds = time.perf_counter() - t
    digest = hashlib.sha256()
    for p in sorted(Path(a.out).iterdir()):
        if p.name != "manifest.jsonl":
            digest.update(p.name.encode() + p.read_bytes())
    return {"engine": engine, "actors": actors, "ray_init_s": round(started, 2), "tag_s": round(seconds, 2),
            "documents": summary["documents"], "output_sha256": digest.hexdigest()}  # fmt: skip


def run_arm(name: str, a, out: Path) -> dict:
    args = [sys.executable, __file__, "--arm", name, "--run", a.run, "--inputs", a.inputs, "--out", str(out)]
    args += ["--precision", a.precision]
    t = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mib(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample)
    th.start()
    stdout = proc.stdout.read()
    proc.wait()
    th.join()
    if proc.returncode:
        raise SystemExit(f"arm {name} failed ({proc.returncode})")
    r = json.loads(stdout.strip().splitlines()[-1])
    r["wall_s"] = round(time.perf_counter() - t, 2)
    r["peak_rss_mib_all_processes"] = round(peak[0], 1)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--precision", default="auto")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        emit(arm(a))
        return
    from loratag.data import load_corpus

    test = load_corpus(a.data).splits["test"]
    sentences = [" ".join(s.tokens) for s in test]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp, "in")
        inputs.mkdir()
        per = -(-len(sentences) // a.shards)
        for i in range(a.shards):
            Path(inputs, f"part-{i:03d}.txt").write_text("\n".join(sentences[i * per : (i + 1) * per]) + "\n")
        a.inputs = str(inputs)
        arms = {name: run_arm(name, a, Path(tmp, name)) for name in ("local", "ray1", "ray2")}
    for r in arms.values():
        r["sentences_per_s"] = round(len(sentences) / r["tag_s"], 1)
    emit(
        {
            "bench": "shards",
            "sentences": len(sentences),
            "shards": a.shards,
            "precision": a.precision,
            "arms": arms,
            "byte_identical": len({r["output_sha256"] for r in arms.values()}) == 1,
            "ray1_vs_local_sentences_per_s": round(
                arms["ray1"]["sentences_per_s"] / arms["local"]["sentences_per_s"], 2
            ),
            "ray2_vs_local_sentences_per_s": round(
                arms["ray2"]["sentences_per_s"] / arms["local"]["sentences_per_s"], 2
            ),
            "cpu": cpu_facts(),
        }
    )


if __name__ == "__main__":
    main()
