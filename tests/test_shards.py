"""Sharded, resumable prediction: local engine and Ray (a local Ray cluster, num_cpus=2)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loratag.cli import main
from loratag.predict.ray import ray_engine
from loratag.predict.shards import MANIFEST, TaggerSpec, find_shards, predict_shards, read_manifest

from .conftest import RESOURCES

WORDS = [json.loads(x)["tokens"] for x in (RESOURCES / "tiny/train.json").read_text().splitlines()]


def _docs(n: int, seed: int) -> list[str]:
    """n documents of one to three sentences from the tiny corpus's words."""
    import random

    rng = random.Random(seed)
    return [" ".join(" ".join(rng.choice(WORDS)) for _ in range(rng.randint(1, 3))) for _ in range(n)]


@pytest.fixture(scope="module")
def run(tagging_run):
    return tagging_run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Shards in every input format: plain text (a document per line), JSON Lines, gzipped JSON Lines, CoNLL."""
    d = tmp_path_factory.mktemp("corpus")
    docs = _docs(320, 0)
    (d / "a.txt").write_text("\n".join(docs[:80]) + "\n")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[80:160]))
    (d / "c.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in docs[160:240]).encode())
    )
    (d / "d.conll").write_text("".join("\n".join(t.split()) + "\n\n" for t in docs[240:320]))
    (d / "notes.md").write_text("not a shard")
    return d


def _kw(run):
    return TaggerSpec(run, precision="fp32")


def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != MANIFEST}


def _manifest_lines(out: Path) -> list[str]:
    return [json.loads(x)["shard"] for x in (out / MANIFEST).read_text().splitlines()]


def test_find_shards_names_each_output_after_its_input(corpus, tmp_path):
    assert [(s.source.name, s.name) for s in find_shards(corpus)] == [
        ("a.txt", "a.jsonl"),
        ("b.jsonl", "b.jsonl"),
        ("c.jsonl.gz", "c.jsonl"),
        ("d.conll", "d.conll"),
    ]
    assert [s.name for s in find_shards(f"{corpus}/*.jsonl*")] == ["b.jsonl", "c.jsonl"]
    with pytest.raises(FileNotFoundError, match="no input shards"):
        find_shards(tmp_path / "*.txt")


def test_local_shards_equal_one_predict_per_shard_and_rerun_skips(run, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    summary = predict_shards(_kw(run), corpus, out, progress=False)
    assert sum(json.loads(x)["entities"] != [] for x in (out / "b.jsonl").read_text().splitlines()) > 0
    assert summary["shards"] == 4 and summary["tagged"] == 4 and summary["documents"] == 320
    for shard in find_shards(corpus):
        single = tmp_path / ("single" + Path(shard.name).suffix)
        assert (
            main(["predict", str(run), "--precision", "fp32", "--input", str(shard.source), "--output", str(single)])
            == 0
        )
        assert (out / shard.name).read_bytes() == single.read_bytes(), shard.name
    assert sorted(_manifest_lines(out)) == ["a.jsonl", "b.jsonl", "c.jsonl", "d.conll"]
    before = _tree(out)
    again = predict_shards(_kw(run), corpus, out, progress=False)
    assert again["tagged"] == 0 and again["skipped"] == 4 and _tree(out) == before
    capsys.readouterr()
    # a torn last manifest line (a kill while appending) is ignored, and that shard is redone once
    lines = (out / MANIFEST).read_text().splitlines()
    (out / MANIFEST).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    assert len(read_manifest(out)) == 3
    assert predict_shards(_kw(run), corpus, out, progress=False)["tagged"] == 1
    assert _tree(out) == before and len(read_manifest(out)) == 4


def _cli(args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "loratag", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _many_shards(tmp_path: Path, n: int = 24, docs: int = 40) -> Path:
    d = tmp_path / "many"
    d.mkdir()
    for i in range(n):
        (d / f"part-{i:03d}.txt").write_text("\n".join(_docs(docs, 100 + i)) + "\n")
    return d


def _kill_after_first_shard(proc, out: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / MANIFEST).is_file() and (out / MANIFEST).read_text().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    raise AssertionError(
        f"no shard finished before the kill (exit {proc.poll()}): {proc.stderr.read().decode()[-2000:]}"
    )


def test_local_kill_9_then_rerun_completes_every_shard_once(run, tmp_path):
    inputs = _many_shards(tmp_path)
    clean = tmp_path / "clean"
    predict_shards(_kw(run), inputs, clean, progress=False)
    out = tmp_path / "out"
    args = ["predict", str(run), "--precision", "fp32", "--input", str(inputs), "--output", str(out)]
    proc = _cli(args)
    _kill_after_first_shard(proc, out)
    finished = len(read_manifest(out))
    assert 1 <= finished < 24, "the run finished before it could be killed"
    rerun = _cli(args)
    assert rerun.wait(300) == 0, rerun.stderr.read().decode()[-2000:]
    assert json.loads(rerun.stdout.read().decode().splitlines()[-1])["skipped"] == finished
    assert _tree(out) == _tree(clean)
    names = _manifest_lines(out)
    assert sorted(names) == sorted(set(names)) == sorted(_tree(clean))  # every shard exactly once
    assert not list(out.glob("*.tmp"))


# ---- Ray ----


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _actor_pids() -> set[int]:
    """The processes of Ray Data actors holding a ShardTagger (Ray names each worker process after its actor)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ShardTagger" in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def test_ray_output_is_byte_identical_to_local(run, corpus, ray_cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    predict_shards(_kw(run), corpus, local, progress=False)
    summary = predict_shards(_kw(run), corpus, remote, engine=ray_engine(actors=2), progress=False)
    assert summary["tagged"] == 4 and summary["documents"] == 320
    assert _tree(remote) == _tree(local)
    assert sorted(_manifest_lines(remote)) == sorted(_manifest_lines(local))


def test_ray_int8_equals_local_int8(run, corpus, ray_cluster, tmp_path):
    """Each Ray actor builds the int8 model from the TaggerSpec as the local engine does: the same bytes."""
    spec = TaggerSpec(run, quantize="int8")
    local, remote = tmp_path / "local", tmp_path / "ray"
    predict_shards(spec, corpus, local, progress=False)
    assert predict_shards(spec, corpus, remote, engine=ray_engine(actors=1), progress=False)["tagged"] == 4
    assert _tree(remote) == _tree(local)


def test_ray_a_killed_actor_is_replaced_and_every_shard_is_written_once(run, ray_cluster, tmp_path):
    if not Path("/proc/self/cmdline").is_file():
        pytest.skip("finds the actor's process through /proc")
    inputs = _many_shards(tmp_path, n=12)
    clean = tmp_path / "clean"
    predict_shards(_kw(run), inputs, clean, progress=False)
    before = _actor_pids()  # actors of earlier tests may linger until Ray reaps them
    killed, seen = [], set()

    def killer():  # kill the first new actor as soon as it exists, before or while it tags
        deadline = time.time() + 300
        while time.time() < deadline:
            for pid in _actor_pids() - before:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    continue
                return
            time.sleep(0.01)

    def watcher():  # every actor process the job had
        while t.is_alive() or not done.is_set():
            seen.update(_actor_pids() - before)
            time.sleep(0.02)

    done = threading.Event()
    t = threading.Thread(target=killer)
    w = threading.Thread(target=watcher)
    t.start()
    w.start()
    out = tmp_path / "out"
    summary = predict_shards(_kw(run), inputs, out, engine=ray_engine(actors=1), progress=False)
    done.set()
    t.join()
    w.join()
    assert killed, "no actor was killed"
    assert len(seen | set(killed)) >= 2, "the killed actor was not replaced"
    assert summary["tagged"] == 12
    assert _tree(out) == _tree(clean)
    names = _manifest_lines(out)
    assert sorted(names) == sorted(set(names)) and len(names) == 12


def test_ray_driver_kill_9_then_rerun_completes_every_shard_once(run, ray_cluster, tmp_path):
    inputs = _many_shards(tmp_path, n=16)
    clean = tmp_path / "clean"
    predict_shards(_kw(run), inputs, clean, progress=False)
    out = tmp_path / "out"
    args = ["predict", str(run), "--precision", "fp32", "--input", str(inputs), "--output", str(out)]
    args += ["--engine", "ray", "--ray-address", ray_cluster]
    proc = _cli(args)
    _kill_after_first_shard(proc, out)
    assert len(read_manifest(out)) < 16, "the run finished before it could be killed"
    rerun = _cli(args)
    assert rerun.wait(300) == 0, rerun.stderr.read().decode()[-2000:]
    assert _tree(out) == _tree(clean)
    names = _manifest_lines(out)
    assert sorted(names) == sorted(set(names)) and len(names) == 16


def test_int8_shards_equal_one_int8_predict_per_shard(run, corpus, tmp_path):
    """--quantize int8 travels with the TaggerSpec: each shard is tagged by the int8 model as predict tags it."""
    out = tmp_path / "out"
    summary = predict_shards(TaggerSpec(run, quantize="int8"), corpus, out, progress=False)
    assert summary["tagged"] == 4
    for shard in find_shards(corpus)[:2]:
        single = tmp_path / ("single" + Path(shard.name).suffix)
        assert (
            main(["predict", str(run), "--quantize", "int8", "--input", str(shard.source), "--output", str(single)])
            == 0
        )
        assert (out / shard.name).read_bytes() == single.read_bytes(), shard.name
