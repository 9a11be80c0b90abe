"""Serving: one server with 1 and with 8 adapters on the MiniLM base, driven from a separate process by a
bounded number of concurrent clients for a fixed time; the same load with batching off; and the memory of
8 single-adapter servers. Prints one JSON line.

    python benchmarks/bench_serve.py [--run RUN] [--clients 32] [--seconds 20]

RUN: a trained MiniLM run (its adapter is one of the 8). --plain-adapter: a plain PEFT adapter trained by the guide's
code (bias all; with --labels), one more of the 8. The rest are random LoRA adapters of the same shape, their bias
kinds in turn none / all / lora_only (random trained-looking biases), which cost the same to serve. Requests carry
one BioNLP2004 test sentence each, adapters in turn; every 50th request is a bad one (a lone surrogate), which must
get 422 and must not fail any other. Answers are checked against `loratag predict` (Tagger) for a sample of every
adapter, at the server's default precision and at fp32.
"compute_bound": the server's model and worker threads tagging without HTTP, in chunks of 1 and of 16
texts: the most batching can gain on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit  # noqa: E402

BIAS_KINDS = ("none", "all", "lora_only")


def make_runs(run: Path | None, n: int, root: Path, extra: list[Path] = ()) -> list[Path]:
    """``run`` and ``extra`` adapters plus random adapters of ``run``'s LoRA shape as run directories, their bias
    kinds in turn none / all / lora_only."""
    import dataclasses

    import torch

    from loratag.config import Config, LoraSettings
    from loratag.labels import LabelSet
    from loratag.modeling import build_model
    from loratag.rundir import save_adapter

    runs = ([run] if run else []) + list(extra)
    labels = (
        LabelSet.load(run / "labels.json")
        if run
        else LabelSet.from_mapping(
            json.loads(
                Path(os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"), "label.json").read_text()
            )
        )
    )
    base_cfg = Config.load(run / "config.json") if run else Config(data="none", lora=LoraSettings(bias="none"))
    for i in range(n - len(runs)):
        bias = BIAS_KINDS[i % len(BIAS_KINDS)]
        cfg = dataclasses.replace(base_cfg, lora=dataclasses.replace(base_cfg.lora, bias=bias))
        torch.manual_seed(100 + i)
        model = build_model(cfg, labels)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
                elif p.requires_grad and name.endswith("bias") and "classifier" not in name:
                    p.add_(torch.randn_like(p) * 0.02)  # trained-looking biases (bias all / lora_only)
        d = root / f"random{i}-{bias.replace('_', '')}"
        d.mkdir(parents=True)
        cfg.save(d / "config.json")
        labels.save(d / "labels.json")
        save_adapter(model, d / "adapter")
        runs.append(d)
    return runs


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(runs: list[Path], extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratag", "serve", *map(str, runs), "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
    raise SystemExit("server did not start")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def load_client(
    url: str, adapters: list[str], texts: list[str], clients: int, seconds: float, bad_every: int = 50
) -> dict:
    """Runs in its own process (`--client`): `clients` concurrent request loops for `seconds`; every
    ``bad_every``-th request is a bad one (counted apart: "errors" counts good requests that failed)."""
    import httpx

    async def main():
        latencies, errors, sentences, bad_sent, bad_refused = [], 0, 0, 0, 0
        stop_at = time.perf_counter() + seconds
        counter = iter(range(10**9))
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

            async def worker():
                nonlocal errors, sentences, bad_sent, bad_refused
                while time.perf_counter() < stop_at:
                    i = next(counter)
                    body = {"adapter": adapters[i % len(adapters)], "text": texts[i % len(texts)]}
                    bad = bool(bad_every) and i % bad_every == bad_every - 1
                    if bad:  # valid JSON with a lone surrogate (ASCII-escaped), which no tokenizer takes
                        body["text"] = body["text"][:20] + "\ud800" + body["text"][20:]
                    t = time.perf_counter()
                    try:
                        content = json.dumps(body).encode()
                        r = await http.post("/v1/tag", content=content, headers={"content-type": "application/json"})
                        status = r.status_code
                    except httpx.HTTPError:
                        status = None
                    if bad:
                        bad_sent += 1
                        bad_refused += status == 422
                        continue
                    latencies.append(time.perf_counter() - t)
                    errors += status != 200
                    sentences += status == 200

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            elapsed = time.perf_counter() - start
        latencies.sort()
        return {
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "sentences_per_s": round(sentences / elapsed, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "requests": len(latencies),
            "errors": errors,
            "bad_requests_sent": bad_sent,
            "bad_requests_answered_422": bad_refused,
        }

    return asyncio.run(main())


def in_child(flag: str, spec: dict) -> dict:
    """Run this script with ``flag SPEC.json`` in a fresh process; its last stdout line is a JSON object."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = subprocess.run([sys.executable, __file__, flag, f.name], capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def drive(url: str, adapters: list[str], texts: list[str], clients: int, seconds: float, bad: int = 50) -> dict:
    """The load comes from a separate process, so client work does not run inside the server's process."""
    spec = {"url": url, "adapters": adapters, "texts": texts, "clients": clients, "seconds": seconds, "bad": bad}
    return in_child("--client", spec)


def mean_batch(url: str) -> float:
    """Texts per forward pass so far, from the server's /metrics."""
    import httpx

    text = httpx.get(url + "/metrics").text
    values = dict(line.split() for line in text.splitlines() if line.startswith("loratag_batch_texts_"))
    return round(float(values["loratag_batch_texts_sum"]) / max(float(values["loratag_batch_texts_count"]), 1), 1)


def ceiling(
    runs: list[str],
    texts: list[str],
    batch: int,
    seconds: float,
    workers: int | None = None,
    labels: str | None = None,
) -> dict:
    """Runs in its own process (`--ceiling`): the server's model and worker threads without HTTP, tagging
    mixed-adapter chunks of ``batch`` texts as fast as they can. Batch 1 vs batch N bounds what batching can
    gain on this machine."""
    import threading

    from loratag.labels import LabelSet
    from loratag.serve.app import default_workers, share_cores
    from loratag.serve.pool import AdapterPool

    pool = AdapterPool([(Path(r), Path(r).name) for r in runs], labels=LabelSet.load(labels) if labels else None)
    workers = workers or default_workers(pool)
    share_cores(pool, workers)
    names = [Path(r).name for r in runs]
    pool.tag(names, texts[: len(names)])  # warm up
    done = [0] * workers
    stop_at = time.perf_counter() + seconds

    def work(k: int) -> None:
        i = k * 1000
        while time.perf_counter() < stop_at:
            chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
            pool.tag([names[(i + j) % len(names)] for j in range(batch)], chunk)
            done[k] += batch
            i += batch

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"batch": batch, "workers": workers, "sentences_per_s": round(sum(done) / (time.perf_counter() - start), 1)}


def run_ceiling(
    runs: list[Path], texts: list[str], batch: int, seconds: float, workers: int | None, labels: Path | None
) -> dict:
    spec = {"runs": list(map(str, runs)), "texts": texts, "batch": batch, "seconds": seconds, "workers": workers}
    spec["labels"] = str(labels) if labels else None
    return in_child("--ceiling", spec)


def check_answers(url: str, runs: list[Path], texts: list[str], precision: str, labels: Path | None) -> dict:
    """Per adapter, mismatches between the server and Tagger (loratag predict) at ``precision`` on a sample: spans
    and labels exact, scores within 1e-3; and the largest score difference."""
    import httpx

    from loratag.labels import LabelSet
    from loratag.tagger import Tagger

    out = {}
    for run in runs:
        extra = LabelSet.load(labels) if labels and not (run / "labels.json").exists() else None
        tagger = Tagger.load(run, labels=extra, precision=precision)
        expected = [d.to_dict() for d in tagger.tag_documents(texts)]
        got = httpx.post(url + "/v1/tag", json={"adapter": run.name, "texts": texts}, timeout=120).json()["results"]
        bad, worst = 0, 0.0
        for e, g in zip(expected, got):
            key = [(x["start"], x["end"], x["label"]) for x in e["entities"]]
            diffs = [abs(a["score"] - b["score"]) for a, b in zip(e["entities"], g["entities"])]
            worst = max([worst, *diffs])
            if key != [(x["start"], x["end"], x["label"]) for x in g["entities"]] or any(d > 1e-3 for d in diffs):
                bad += 1
        out[run.name] = {"mismatches": bad, "of": len(texts), "max_score_diff": round(worst, 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a trained MiniLM run (any bias)")
    p.add_argument("--plain-adapter", type=Path, help="a plain PEFT adapter (the guide's), served with --labels")
    p.add_argument("--labels", type=Path, help="label.json for --plain-adapter")
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's batching window")
    p.add_argument("--workers", type=int, help="the servers' --workers [default: theirs]")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--ceiling", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ceiling:
        spec = json.loads(Path(a.ceiling).read_text())
        emit(ceiling(spec["runs"], spec["texts"], spec["batch"], spec["seconds"], spec["workers"], spec["labels"]))
        return
    if a.client:
        spec = json.loads(Path(a.client).read_text())
        emit(load_client(spec["url"], spec["adapters"], spec["texts"], spec["clients"], spec["seconds"], spec["bad"]))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    from loratag.data import load_corpus

    test = load_corpus(a.data).splits["test"]
    texts = [" ".join(s.tokens) for s in random.Random(0).sample(test, 400)]
    out = {"clients": a.clients, "seconds": a.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(a.run, 8, Path(tmp), [a.plain_adapter] if a.plain_adapter else [])
        names = [r.name for r in runs]
        configs = [
            r / "adapter/adapter_config.json" if (r / "adapter").is_dir() else r / "adapter_config.json" for r in runs
        ]
        out["adapter_bias"] = {r.name: json.loads(c.read_text())["bias"] for r, c in zip(runs, configs)}

        workers = ["--workers", str(a.workers)] if a.workers else []
        if a.labels:
            workers += ["--labels", str(a.labels)]
        wait = ["--batch-wait-ms", str(a.batch_wait_ms), *workers]
        out["batch_wait_ms"], out["workers"] = a.batch_wait_ms, a.workers or "default"
        proc, url = start_server(runs[:1], wait)
        out["one_adapter"] = {
            "server_rss_mib": rss_mib(proc.pid),
            **drive(url, names[:1], texts, a.clients, a.seconds),
        }
        out["one_adapter"]["server_rss_after_mib"] = rss_mib(proc.pid)
        out["one_adapter"]["mean_batch_texts"] = mean_batch(url)
        stop(proc)

        proc, url = start_server(runs, wait)
        out["eight_adapters"] = {"server_rss_mib": rss_mib(proc.pid), **drive(url, names, texts, a.clients, a.seconds)}
        out["eight_adapters"]["server_rss_after_mib"] = rss_mib(proc.pid)
        out["eight_adapters"]["mean_batch_texts"] = mean_batch(url)
        out["answers_vs_predict_auto"] = check_answers(url, runs, texts[:50], "auto", a.labels)
        stop(proc)
        proc, url = start_server(runs, [*wait, "--precision", "fp32"])
        out["answers_vs_predict_fp32"] = check_answers(url, runs, texts[:50], "fp32", a.labels)
        stop(proc)

        proc, url = start_server(runs, ["--no-batching", *workers])
        out["eight_adapters_no_batching"] = drive(url, names, texts, a.clients, a.seconds)
        stop(proc)

        # What batching can gain here at most: the same model and workers without HTTP, batch 1 vs 16.
        out["compute_bound"] = {
            "batch_1": run_ceiling(runs, texts, 1, a.seconds / 2, a.workers, a.labels),
            "batch_16": run_ceiling(runs, texts, 16, a.seconds / 2, a.workers, a.labels),
        }
        servers = [start_server([r], ["--labels", str(a.labels)] if a.labels else []) for r in runs]
        out["eight_single_adapter_servers_rss_mib"] = round(sum(rss_mib(pr.pid) for pr, _ in servers), 1)
        for pr, _ in servers:
            stop(pr)

    one, eight = out["one_adapter"]["server_rss_after_mib"], out["eight_adapters"]["server_rss_after_mib"]
    out["memory_ratio_8_vs_1"] = round(eight / one, 3)
    out["memory_ratio_8_servers_vs_1_server_8_adapters"] = round(
        out["eight_single_adapter_servers_rss_mib"] / eight, 2
    )
    out["batching_speedup"] = round(
        out["eight_adapters"]["sentences_per_s"] / max(out["eight_adapters_no_batching"]["sentences_per_s"], 1e-9), 2
    )
    bound = out["compute_bound"]
    bound["speedup"] = round(bound["batch_16"]["sentences_per_s"] / max(bound["batch_1"]["sentences_per_s"], 1e-9), 2)
    out["cpu"] = cpu_facts()
    emit(out)


if __name__ == "__main__":
    main()
