"""Adapters that come and go under load, and memory with --max-adapters. Prints one JSON line per phase.

    python benchmarks/bench_serve_churn.py --runs R42 R42b R43 --dna DNA [--phase churn|memory|all]

R42, R42b, R43: three trained 11-label MiniLM runs of BioNLP2004 (different answers); DNA: a one-type run (3 labels).

churn: one `loratag serve --runs-dir D --watch --allow-root A --precision fp32` (a real server process) holding an
11-label run ("bionlp"), the one-type run ("dna") and a plain PEFT adapter (an adapter folder with id2label, no run
files: "plain"). 16 clients (a separate process) send 1-4 BioNLP2004 test sentences per request for --seconds,
adapters in turn, while this process changes the folder and calls the admin API on a schedule: a run is copied in
file by file ("new"), "bionlp" is replaced in place by another run, a broken run appears (its labels.json one label
short of its head), a run is added through POST /v1/adapters ("posted"), "new" is removed, "posted" is deleted.
Every 200 answer is checked against `loratag predict` (Tagger, fp32) for its adapter: spans and labels exact, scores
within 1e-3 (for "bionlp", either version's; after the switch the new one's). "new" and "posted" may answer 404
before they are served and after they go; "broken" must answer 404. Any 5xx, or any other status, is a failure.
Reported: requests/s, p50/p99 latency, per-adapter counts, how long "new" took from the end of its copy to its
first answer, and load seconds from the server's /metrics.

memory: 20 adapters (random LoRA of the run's shape, bias kinds none/all/lora_only, as bench_serve.py makes them),
used in turn by 4 clients, in a server with --max-adapters 4 and in one without; the server's peak RSS (VmHWM)
and RSS over time, cold loads and evictions from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit, matmul_peak  # noqa: E402
from bench_serve import make_runs, stop  # noqa: E402

ADMIN = "bench-admin-key-0123456789"


def start(args: list[str], env: dict | None = None):
    """A `loratag serve` process with ``args``; (process, url) once /healthz answers."""
    import os
    import socket
    import subprocess

    import httpx

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    log = open(tempfile.mktemp(suffix=".log"), "w")  # noqa: SIM115 - the server's log, kept for a failure
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratag", "serve", *args, "--port", str(port)],
        stdout=log, stderr=log, env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, log.name
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; log: {log.name}")
    raise SystemExit("server did not start")


def in_child(flag: str, spec: dict) -> dict:
    """Run this script with ``flag SPEC.json`` in a fresh process (the clients: their work stays out of the server's
    process and this one's); its last stdout line is a JSON object."""
    import subprocess

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = subprocess.run([sys.executable, __file__, flag, f.name], capture_output=True, text=True, check=True)
    Path(f.name).unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


def metric(text: str, name: str) -> float:
    return sum(
        float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{")
    )


def vm(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def expected_answers(runs: dict[str, Path], texts: list[str]) -> dict[str, list[dict]]:
    """`loratag predict` (Tagger, fp32) for every text, per run."""
    from loratag.tagger import Tagger

    return {
        key: [d.to_dict() for d in Tagger.load(run, precision="fp32").tag_documents(texts)]
        for key, run in runs.items()
    }


def matches(got: dict, want: dict) -> bool:
    if [(e["start"], e["end"], e["label"]) for e in got["entities"]] != [
        (e["start"], e["end"], e["label"]) for e in want["entities"]
    ]:
        return False
    return all(abs(a["score"] - b["score"]) <= 1e-3 for a, b in zip(got["entities"], want["entities"]))


def churn_client(spec: dict) -> dict:
    """16 request loops (in its own process); each answer checked against the versions allowed for its adapter."""
    import httpx

    texts, expected, plan = spec["texts"], spec["expected"], spec["plan"]

    async def main():
        stats = {a: {"200": 0, "404": 0, "other": 0, "mismatch": 0} for a in plan}
        lat, first_ok, others = [], {}, []
        stop_at = time.time() + spec["seconds"]
        rng = random.Random(0)
        limits = httpx.Limits(max_connections=spec["clients"], max_keepalive_connections=spec["clients"])
        async with httpx.AsyncClient(base_url=spec["url"], timeout=120, limits=limits) as http:

            async def worker(k: int):
                i = k
                while time.time() < stop_at:
                    adapter = spec["turns"][i % len(spec["turns"])]
                    i += spec["clients"]
                    idx = [rng.randrange(len(texts)) for _ in range(rng.randint(1, 4))]
                    t, sent_at = time.perf_counter(), time.time()
                    try:
                        r = await http.post("/v1/tag", json={"adapter": adapter, "texts": [texts[j] for j in idx]})
                        status = r.status_code
                    except httpx.HTTPError as e:
                        status, r = None, e
                    lat.append(time.perf_counter() - t)
                    s = stats[adapter]
                    if status == 200:
                        s["200"] += 1
                        first_ok.setdefault(adapter, sent_at)
                        allowed = [expected[v] for v in allowed_versions(plan[adapter], sent_at)]
                        results = r.json()["results"]
                        if not any(all(matches(g, ver[j]) for g, j in zip(results, idx)) for ver in allowed):
                            s["mismatch"] += 1
                        if "next" in plan[adapter]:  # which version answered: the switch happened, and when
                            old = all(matches(g, expected[plan[adapter]["version"]][j]) for g, j in zip(results, idx))
                            new = all(matches(g, expected[plan[adapter]["next"]][j]) for g, j in zip(results, idx))
                            if old != new:
                                key = "old_version" if old else "new_version"
                                s[key] = s.get(key, 0) + 1
                                if new:
                                    first_ok.setdefault(adapter + "@new", sent_at)
                    elif status == 404 and plan[adapter]["may_404"]:
                        s["404"] += 1
                    else:
                        s["other"] += 1
                        others.append((adapter, status, str(getattr(r, "text", r))[:200]))

            start = time.time()
            await asyncio.gather(*(worker(k) for k in range(spec["clients"])))
            elapsed = time.time() - start
        lat.sort()
        return {
            "seconds": round(elapsed, 1),
            "requests": len(lat),
            "requests_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 1),
            "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 1),
            "by_adapter": stats,
            "first_200_at": first_ok,
            "unexpected": others[:10],
            "unexpected_count": len(others),
        }

    return asyncio.run(main())


def allowed_versions(plan: dict, sent_at: float) -> list[str]:
    """The versions an answer may come from: before a switch the old one, after it (plus a margin for requests
    already in a batch) the new one only, in between either."""
    switch = plan.get("switch_at")
    if switch is None:
        return [plan["version"]]
    if sent_at < switch:
        return [plan["version"], plan["next"]]  # the switch time is the copy's end; loading follows
    return [plan["next"]] if sent_at > switch + plan.get("settle", 10) else [plan["version"], plan["next"]]


def churn(a, texts: list[str]) -> dict:
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d, allowed = tmp / "runs", tmp / "allowed"
        d.mkdir()
        allowed.mkdir()
        r42, r42b, r43 = a.runs
        shutil.copytree(r42, d / "bionlp")
        shutil.copytree(a.dna, d / "dna")
        plain = d / "plain"  # a plain PEFT adapter: the adapter folder, and its labels as transformers saves them
        shutil.copytree(r43 / "adapter", plain)
        labels = json.loads((r43 / "labels.json").read_text())
        labels = labels if isinstance(labels, list) else sorted(labels, key=labels.get)
        (plain / "config.json").write_text(json.dumps({"id2label": dict(enumerate(labels))}))
        shutil.copytree(r42b, allowed / "posted")
        versions = {"r42": r42, "r42b": r42b, "r43": r43, "dna": a.dna, "plain": plain}
        expected = expected_answers(versions, texts)
        proc, url, log = start(
            ["--runs-dir", str(d), "--watch", "--allow-root", str(allowed), "--precision", "fp32"],
            env={"LORATAG_ADMIN_KEY": ADMIN},
        )
        events, t0 = {}, time.time()
        plan = {
            "bionlp": {"version": "r42", "next": "r42b", "switch_at": None, "may_404": False},
            "dna": {"version": "dna", "may_404": False},
            "plain": {"version": "plain", "may_404": False},
            "new": {"version": "r43", "may_404": True},
            "posted": {"version": "r42b", "may_404": True},
            "broken": {"version": "r43", "may_404": True},
        }
        switch_at = t0 + 0.35 * a.seconds  # known in advance: the client checks versions by the clock
        plan["bionlp"]["switch_at"] = switch_at
        turns = ["bionlp", "dna", "plain", "new", "bionlp", "dna", "plain", "posted", "broken"]
        spec = {"url": url, "texts": texts, "expected": expected, "plan": plan, "turns": turns, "clients": 16,
                "seconds": a.seconds}  # fmt: skip
        admin = {"authorization": f"Bearer {ADMIN}"}

        def schedule():
            def at(frac: float):
                time.sleep(max(0.0, t0 + frac * a.seconds - time.time()))

            at(0.15)
            shutil.copytree(r43, d / "new")  # file by file, as cp -r does
            events["new_copied"] = time.time()
            at(0.35)
            for f in ("labels.json", "config.json", "metrics.json"):  # replaced in place: another run's files
                shutil.copy(r42b / f, d / "bionlp" / f)
            shutil.copy(
                r42b / "adapter" / "adapter_model.safetensors", d / "bionlp" / "adapter" / "adapter_model.safetensors"
            )
            shutil.copy(r42b / "adapter" / "adapter_config.json", d / "bionlp" / "adapter" / "adapter_config.json")
            events["bionlp_replaced"] = time.time()
            at(0.5)
            broken = tmp / "broken"
            shutil.copytree(r43, broken)
            lab = json.loads((broken / "labels.json").read_text())
            lab = lab[:-1] if isinstance(lab, list) else dict(list(lab.items())[:-1])
            (broken / "labels.json").write_text(json.dumps(lab))
            broken.rename(d / "broken")  # appears at once, whole
            events["broken_appeared"] = time.time()
            at(0.6)
            t = time.time()
            r = httpx.post(url + "/v1/adapters", json={"name": "posted", "path": str(allowed / "posted")},
                           headers=admin, timeout=120)  # fmt: skip
            events["posted"] = {"status": r.status_code, "seconds": round(time.time() - t, 3), "at": t}
            at(0.75)
            shutil.rmtree(d / "new")
            events["new_removed"] = time.time()
            at(0.85)
            r = httpx.delete(url + "/v1/adapters/posted", headers=admin, timeout=60)
            events["posted_deleted"] = {"status": r.status_code, "at": time.time()}

        thread = threading.Thread(target=schedule)
        thread.start()
        client = in_child("--churn-client", spec)
        thread.join()
        listed = httpx.get(url + "/v1/adapters").json()["adapters"]
        metrics = httpx.get(url + "/metrics").text
        stop(proc)
    out = {"phase": "churn", **client}
    out["new_first_answer_after_copy_s"] = round(
        client["first_200_at"].get("new", float("nan")) - events["new_copied"], 2
    )
    out["bionlp_new_version_first_after_replace_s"] = round(
        client["first_200_at"].get("bionlp@new", float("nan")) - events["bionlp_replaced"], 2
    )
    out["posted"] = events["posted"]
    out["posted_deleted"] = events["posted_deleted"]["status"]
    out["listed_at_end"] = {
        x["name"]: x["status"] + (f" ({x['error'][:80]})" if x.get("error") else "") for x in listed
    }
    out["server_5xx"] = metric(metrics, 'loratag_errors_total{status="500"}') + metric(
        metrics, 'loratag_errors_total{status="503"}'
    )
    count = metric(metrics, "loratag_adapter_load_seconds_count")
    out["loads"] = count
    out["load_seconds_mean"] = round(metric(metrics, "loratag_adapter_load_seconds_sum") / max(count, 1), 3)
    out["load_failures"] = metric(metrics, "loratag_adapter_load_failures_total")
    out["events_s"] = {k: round((v if isinstance(v, float) else v["at"]) - t0, 1) for k, v in events.items()}
    del out["first_200_at"]
    return out


def memory(a, texts: list[str]) -> dict:
    import httpx

    out = {"phase": "memory", "adapters": 20}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "runs"
        runs = make_runs(a.runs[0], 20, d)  # the run itself and 19 random adapters beside it in d
        shutil.copytree(runs[0], d / runs[0].name)
        names = sorted(p.name for p in d.iterdir())
        for arm, extra in (("max4", ["--max-adapters", "4"]), ("all", [])):
            proc, url, _ = start(["--runs-dir", str(d), *extra])
            start_rss = vm(proc.pid, "VmRSS")
            samples = []
            spec = {"url": url, "texts": texts, "clients": 4, "seconds": a.memory_seconds, "turns": names}
            done = threading.Event()

            def sample(pid=proc.pid, done=done, samples=samples):
                while not done.wait(0.5):
                    samples.append(vm(pid, "VmRSS"))

            sampler = threading.Thread(target=sample)
            sampler.start()
            client = in_child("--memory-client", spec)
            done.set()
            sampler.join()
            metrics = httpx.get(url + "/metrics").text
            out[arm] = {
                "rss_after_start_mib": start_rss,
                "peak_rss_mib": vm(proc.pid, "VmHWM"),
                "rss_last_mib": samples[-1] if samples else None,
                "rss_max_sampled_mib": max(samples) if samples else None,
                "rss_every_5s_mib": samples[::10],
                "stacked_at_end": metric(metrics, "loratag_adapters_stacked"),
                "loads": metric(metrics, "loratag_adapter_load_seconds_count"),
                "load_seconds_mean": round(
                    metric(metrics, "loratag_adapter_load_seconds_sum")
                    / max(metric(metrics, "loratag_adapter_load_seconds_count"), 1),
                    3,
                ),
                "evictions": metric(metrics, "loratag_adapter_evictions_total"),
                **{k: client[k] for k in ("requests", "requests_per_s", "p50_ms", "p99_ms", "unexpected_count")},
            }
            stop(proc)
    return out


def memory_client(spec: dict) -> dict:
    """Adapters in turn, 200 expected; no answer check (the adapters are random)."""
    import httpx

    texts = spec["texts"]

    async def main():
        lat, others = [], 0
        stop_at = time.time() + spec["seconds"]
        async with httpx.AsyncClient(base_url=spec["url"], timeout=120) as http:

            async def worker(k: int):
                nonlocal others
                i = k
                while time.time() < stop_at:
                    adapter = spec["turns"][i % len(spec["turns"])]
                    i += 1  # each client walks all adapters in turn
                    t = time.perf_counter()
                    r = await http.post("/v1/tag", json={"adapter": adapter, "texts": texts[i % 50 : i % 50 + 2]})
                    lat.append(time.perf_counter() - t)
                    others += r.status_code != 200

            start = time.time()
            await asyncio.gather(*(worker(k * 5) for k in range(spec["clients"])))
            elapsed = time.time() - start
        lat.sort()
        return {
            "requests": len(lat),
            "requests_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 1),
            "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 1),
            "unexpected_count": others,
        }

    return asyncio.run(main())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs=3, help="three trained 11-label MiniLM runs")
    p.add_argument("--dna", type=Path, help="a one-type (3-label) MiniLM run")
    p.add_argument("--data", default="../shared/data/bionlp2004")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--memory-seconds", type=float, default=40)
    p.add_argument("--phase", choices=["churn", "memory", "all"], default="all")
    p.add_argument("--churn-client", help=argparse.SUPPRESS)
    p.add_argument("--memory-client", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.churn_client:
        emit(churn_client(json.loads(Path(a.churn_client).read_text())))
        return
    if a.memory_client:
        emit(memory_client(json.loads(Path(a.memory_client).read_text())))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    from loratag.data import load_corpus

    test = load_corpus(a.data).splits["test"]
    texts = [" ".join(s.tokens) for s in random.Random(0).sample(test, 200)]
    facts = {"cpu": cpu_facts(), "matmul_gflops": matmul_peak()}
    if a.phase in ("churn", "all"):
        emit({**churn(a, texts), **facts})
    if a.phase in ("memory", "all"):
        emit({**memory(a, texts), **facts})


if __name__ == "__main__":
    main()
