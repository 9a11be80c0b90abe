"""Serve many adapters on one base model over HTTP (FastAPI + uvicorn, imported only here).

AdapterPool loads every adapter onto one shared base (PEFT ``load_adapter``: each adapter carries its own
classifier head) and tags mixed-adapter batches with PEFT's per-row ``adapter_names``, through the same
Tagger path as ``loratag predict``. The Batcher gathers concurrent requests for a few milliseconds into one
forward pass; a request's answer does not depend on what it was batched with (rows are independent; padding is
masked).
"""

# No `from __future__ import annotations` here: FastAPI must see the request model classes defined inside
# create_app as real annotations, not strings it would look up in the module.
import asyncio
import concurrent.futures
import contextlib
import copy
import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import multilora
from .config import FORMAT, Config
from .inference import TaggedDocument, Tagger
from .labels import LabelSet
from .modeling import device_of, load_adapter, load_tokenizer, resolve_model

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class Adapter:
    name: str
    run: Path
    labels: LabelSet
    metrics: dict = field(default_factory=dict)


def parse_runs(specs: list[str], runs_dir: Path | None = None) -> list[tuple[Path, str]]:
    """``RUN`` or ``RUN:NAME`` arguments (and every run in ``runs_dir``) -> (path, adapter name)."""
    out = []
    if runs_dir is not None:
        if not runs_dir.is_dir():
            raise FileNotFoundError(f"--runs-dir {runs_dir} is not a directory")
        out += [(p, p.name) for p in sorted(runs_dir.iterdir()) if (p / "adapter").is_dir()]
        if not out:
            raise FileNotFoundError(f"--runs-dir {runs_dir}: no run directories (with adapter/) inside")
    for spec in specs:
        path, _, name = spec.partition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
        out.append((Path(path), name or Path(path).name))
    if not out:
        raise ValueError("name at least one run directory to serve (or --runs-dir)")
    return out


def _check_run(path: Path, name: str) -> tuple[Config, LabelSet, dict]:
    if not NAME.match(name):
        raise ValueError(f"{path}: adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    cfg_path = path / "config.json"
    if not cfg_path.is_file() or json.loads(cfg_path.read_text()).get("format") != FORMAT:
        raise FileNotFoundError(f"{path}: not a loratag run directory (no config.json of format {FORMAT})")
    adapter = path / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no adapter/adapter_model.safetensors (only safetensors adapters are served)")
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    if acfg.get("bias", "none") != "none":
        raise ValueError(
            f"{path}: trained with bias={acfg['bias']!r}; only bias='none' adapters can share a base model "
            "(trained biases change the base for every adapter). Retrain with --bias none."
        )
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    summary = {k: metrics["test"][k] for k in ("precision", "recall", "f1")} if "test" in metrics else {}
    return Config.load(cfg_path), LabelSet.load(path / "labels.json"), summary


class AdapterPool:
    """One base model, N adapters; refuses at start what cannot share the base, naming the run and why."""

    def __init__(
        self, runs: list[tuple[Path, str]], device: str | None = None, batch_size: int = 64, base: str | None = None
    ):
        """``base``: one base model for every adapter, instead of the one each run names."""
        self.adapters: dict[str, Adapter] = {}
        base_name, first = None, None
        for path, name in runs:
            cfg, labels, metrics = _check_run(path, name)
            if name in self.adapters:
                raise ValueError(f"{path}: adapter name {name!r} is used twice; name it with RUN:NAME")
            resolved = resolve_model(base or cfg.model)
            if base_name is None:
                base_name, first = resolved, (path, labels)
            elif resolved != base_name:
                raise ValueError(f"{path}: base model {cfg.model!r} differs from {first[0]}'s; one server, one base")
            elif len(labels) != len(first[1]):
                raise ValueError(
                    f"{path}: {len(labels)} labels but {first[0]} has {len(first[1])}; adapters in one server "
                    "need the same number of labels"
                )
            self.adapters[name] = Adapter(name, path, labels, metrics)
        names = list(self.adapters)
        first_adapter = self.adapters[names[0]]
        model = load_adapter(first_adapter.run / "adapter", first_adapter.labels, base_name, adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(self.adapters[name].run / "adapter"), adapter_name=name, is_trainable=False)
        model = model.to(device_of(device)).eval()
        # Stacked adapters (multilora.py): a mixed batch costs what a one-adapter batch costs; PEFT's own
        # per-adapter loop stays for what that does not cover (DoRA, LoRA on embeddings, ...).
        stacked = multilora.build(model, names)
        if stacked is None:
            log.info("adapters are not all plain LoRA on Linear layers: PEFT's mixed-batch path is used")
        self.stacked = stacked is not None
        if stacked is not None:
            model = stacked
        self.tagger = Tagger(
            model, load_tokenizer(base_name), first_adapter.labels, batch_size=batch_size, device=device_of(device)
        )
        self._local = threading.local()
        # PEFT's own mixed-batch path adds hooks to shared modules: one call at a time there
        self._serial = contextlib.nullcontext() if self.stacked else threading.Lock()
        log.info("serving %d adapter(s) on %s: %s", len(names), base_name, ", ".join(names))

    def _thread_tagger(self) -> Tagger:
        """Worker threads share the model but each gets its own tokenizer: a fast tokenizer's Rust state is
        not safe to use from two threads at once ("Already borrowed")."""
        tagger = getattr(self._local, "tagger", None)
        if tagger is None:
            tagger = copy.copy(self.tagger)
            tagger.tokenizer = copy.deepcopy(self.tagger.tokenizer)
            self._local.tagger = tagger
        return tagger

    def tag(self, adapters: list[str], texts: list[str]) -> list[TaggedDocument]:
        """One forward pass (in sorted batches) over texts of any adapters; threads may call it side by side
        (PEFT's own mixed-batch path then runs one call at a time)."""
        label_sets = [self.adapters[a].labels for a in adapters]
        with self._serial:
            return self._thread_tagger().tag_documents(texts, adapters=adapters, label_sets=label_sets)


class QueueFull(Exception):
    pass


class Batcher:
    """Gathers concurrent requests for up to ``wait_ms`` (or ``max_texts`` texts) into one forward pass.

    ``workers`` threads own the model (shared, read-only); one of them at a time gathers a batch from the
    queue while the others run theirs, so a batch forms while the previous one computes. Requests wait on
    futures, so the event loop keeps answering (health, metrics, errors) while batches run, and no event
    loop has to be the one the batcher started in. ``batching=False``: one request per forward pass (for
    comparison; the workers stay).
    """

    def __init__(
        self,
        pool: AdapterPool,
        wait_ms: float = 5.0,
        max_texts: int = 256,
        max_queue: int = 1024,
        batching: bool = True,
        on_batch=None,
        workers: int = 1,
    ):
        self.pool, self.wait, self.max_texts, self.max_queue = pool, wait_ms / 1000, max_texts, max_queue
        self.batching = batching
        self.on_batch = on_batch or (lambda n: None)
        self.queue: queue.Queue = queue.Queue()
        self.gathering = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, name=f"loratag-worker-{i}", daemon=True) for i in range(max(1, workers))
        ]
        for t in self.threads:
            t.start()

    async def submit(self, adapter: str, texts: list[str]) -> list[TaggedDocument]:
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((adapter, texts, fut))
        return await asyncio.wrap_future(fut)

    def _take(self) -> list:
        with self.gathering:  # one gatherer at a time: two would split one burst into two small batches
            taken = [self.queue.get()]
            n = len(taken[0][1])
            if not self.batching:
                return taken
            deadline = time.monotonic() + self.wait
            while n < self.max_texts:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                taken.append(item)
                n += len(item[1])
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            adapters = [a for a, texts, _ in taken for _ in texts]
            texts = [t for _, ts, _ in taken for t in ts]
            self.on_batch(len(texts))
            try:
                docs = self.pool.tag(adapters, texts)
            except Exception as e:  # one bad batch must not stop the server: its requests get the error
                log.exception("batch failed")
                for _, _, fut in taken:
                    fut.set_exception(e)
                continue
            i = 0
            for _, ts, fut in taken:
                fut.set_result(docs[i : i + len(ts)])
                i += len(ts)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            return await self.app(scope, limited, send)
        except _TooLarge:
            return await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"detail": f"request body over {self.limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class Observe:
    """ASGI middleware: reports each HTTP request's path, status and seconds (the 413s of BodyLimit too).
    Plain ASGI rather than FastAPI's ``@app.middleware``, which wraps every request in extra tasks and
    streams."""

    def __init__(self, app, report):
        self.app, self.report = app, report

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.report(scope["path"], status, time.perf_counter() - start)


@dataclass(frozen=True)
class ServeSettings:
    wait_ms: float = 5.0
    max_batch_texts: int = 256
    max_queue: int = 1024
    max_body_bytes: int = 1 << 20
    max_text_chars: int = 100_000
    max_texts: int = 256
    batching: bool = True
    workers: int = 1


def create_app(pool: AdapterPool, settings: ServeSettings = ServeSettings()):
    """The FastAPI application (tests call it in-process)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    registry = CollectorRegistry()
    requests = Counter("loratag_requests", "HTTP requests", ["path", "status"], registry=registry)
    latency = Histogram(
        "loratag_request_seconds",
        "request latency",
        ["path"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    batch_sizes = Histogram(
        "loratag_batch_texts", "texts per forward batch", registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
    )
    errors = Counter("loratag_errors", "requests answered with an error", ["status"], registry=registry)
    batcher = Batcher(
        pool,
        settings.wait_ms if settings.batching else 0,
        settings.max_batch_texts,
        settings.max_queue,
        settings.batching,
        on_batch=batch_sizes.observe,
        workers=settings.workers,
    )

    class TagRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        adapter: str = Field(description="adapter name, as listed by GET /v1/adapters")
        text: str | None = Field(None, description="one text to tag")
        texts: list[str] | None = Field(None, description=f"several texts (at most {settings.max_texts})")

        @model_validator(mode="after")
        def one_of(self):
            if (self.text is None) == (self.texts is None):
                raise ValueError("give exactly one of 'text' or 'texts'")
            if self.texts is not None and not 1 <= len(self.texts) <= settings.max_texts:
                raise ValueError(f"'texts' must hold 1 to {settings.max_texts} texts")
            return self

    class EntityOut(BaseModel):
        text: str
        label: str
        start: int = Field(description="character offset into the text (inclusive)")
        end: int = Field(description="character offset into the text (exclusive)")
        score: float

    class DocumentOut(BaseModel):
        text: str
        entities: list[EntityOut]

    class TagResponse(BaseModel):
        adapter: str
        results: list[DocumentOut]

    class AdapterOut(BaseModel):
        name: str
        labels: list[str]
        metrics: dict

    class AdaptersResponse(BaseModel):
        adapters: list[AdapterOut]

    app = FastAPI(
        title="loratag",
        version="v1",
        description="Token classification (NER) with many LoRA adapters on one base model.",
    )

    @app.post(
        "/v1/tag",
        response_model=TagResponse,
        responses={
            404: {"description": "unknown adapter"},
            413: {"description": "body or text too large"},
            503: {"description": "queue full; retry after the Retry-After seconds"},
        },
    )
    async def tag(req: TagRequest):
        """Entities of each text (`text`, `label`, `start`, `end`, `score`), as `loratag predict` gives them."""
        if req.adapter not in pool.adapters:
            raise HTTPException(404, f"unknown adapter {req.adapter!r}; known: {', '.join(pool.adapters)}")
        texts = [req.text] if req.text is not None else req.texts
        for i, t in enumerate(texts):
            if len(t) > settings.max_text_chars:
                raise HTTPException(413, f"text {i} has {len(t)} characters; the limit is {settings.max_text_chars}")
        try:
            docs = await batcher.submit(req.adapter, texts)
        except QueueFull:
            raise HTTPException(503, "the server is busy; retry shortly", headers={"Retry-After": "1"}) from None
        # A ready response: FastAPI would otherwise validate the dicts again against TagResponse (the schema
        # still documents it), a cost paid per request in the event loop every other request waits on.
        return JSONResponse({"adapter": req.adapter, "results": [d.to_dict() for d in docs]})

    @app.get("/v1/adapters", response_model=AdaptersResponse)
    async def adapters():
        """The adapters this server holds, their labels and their test metrics."""
        return {
            "adapters": [
                {"name": a.name, "labels": list(a.labels.labels), "metrics": a.metrics} for a in pool.adapters.values()
            ]
        }

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "adapters": len(pool.adapters)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        """Prometheus text format: requests, latency, batch sizes, errors."""
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return (Path(__file__).parent / "page.html").read_text(encoding="utf-8")

    known_paths = {"/v1/tag", "/v1/adapters", "/healthz", "/metrics", "/"}

    def observe(path: str, status: int, seconds: float) -> None:
        path = path if path in known_paths else "other"
        requests.labels(path, str(status)).inc()
        latency.labels(path).observe(seconds)
        if status >= 400:
            errors.labels(str(status)).inc()

    return Observe(BodyLimit(app, settings.max_body_bytes), observe), app


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(pool: AdapterPool) -> int:
    """Two worker threads on a CPU with two cores or more (each then runs its own batch on its share of the
    cores: on 2 cores with MiniLM and 8 adapters, two 1-thread workers tagged 1.05-1.3x the sentences/s of one
    2-thread worker in batches of 16, and 1.3-1.6x one by one); one on a GPU, and where PEFT's own mixed-batch
    path serialises calls."""
    if pool.tagger.device.type != "cpu" or not pool.stacked:
        return 1
    return min(2, cpu_cores())


def share_cores(pool: AdapterPool, workers: int) -> None:
    """On the CPU, each worker gets an equal share of the cores as torch threads. Process-wide, so called by
    ``run`` and not by create_app, which tests call in their own process."""
    import torch

    if pool.tagger.device.type == "cpu":
        torch.set_num_threads(max(1, cpu_cores() // workers))


def run(pool: AdapterPool, host: str, port: int, settings: ServeSettings) -> None:
    """Serve until interrupted."""
    import torch
    import uvicorn

    share_cores(pool, settings.workers)
    log.info("%d worker(s), %d torch thread(s) each", settings.workers, torch.get_num_threads())
    wrapped, _ = create_app(pool, settings)
    uvicorn.run(wrapped, host=host, port=port, log_level="info")
