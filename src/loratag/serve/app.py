"""`loratag serve`: the HTTP application (FastAPI + uvicorn, imported only here) over the adapter pool and batcher:
request and response schemas, routes, limits, metrics, running. The settings' defaults live in
config.ServeSettings only; the CLI reads its flags and defaults from there.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.
import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from ..config import ServeSettings
from ..text import count_words
from .asgi import Auth, BodyLimit, Observe
from .batcher import Batcher, QueueFull
from .pool import NAME, AdapterPool, UnknownAdapter

log = logging.getLogger(__name__)


def bad_unicode(text: str) -> int | None:
    """The position of the first character that is not valid Unicode text (a lone surrogate such as \\ud800,
    which JSON allows and UTF-8 cannot encode; the tokenizer fails on it), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


TEXT_FORMAT = "unicode-text"  # a schema annotation (any text a JSON string carries); the fuzz test generates it
UnicodeText = Annotated[str, WithJsonSchema({"type": "string", "format": TEXT_FORMAT})]


class TagRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description="adapter name, as listed by GET /v1/adapters")
    text: UnicodeText | None = Field(None, description="one text to tag")
    texts: list[UnicodeText] | None = Field(None, description="several texts (at most --max-texts)")

    @field_validator("text")
    @classmethod
    def text_is_unicode(cls, v):
        if v is not None and (pos := bad_unicode(v)) is not None:
            raise ValueError(f"not valid Unicode text: a lone surrogate at character {pos}")
        return v

    @field_validator("texts")
    @classmethod
    def texts_are_unicode(cls, v):
        for i, t in enumerate(v or []):
            if (pos := bad_unicode(t)) is not None:
                raise ValueError(f"text {i} is not valid Unicode text: a lone surrogate at character {pos}")
        return v

    @model_validator(mode="after")
    def one_of(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
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
    status: str = Field(
        description="ready (stacked: answers at once), idle (evicted by --max-adapters: loaded on its next use) or "
        "failed (not served: see error)"
    )
    labels: list[str] = []
    bias: str = Field("none", description="which biases the adapter trained: none, all or lora_only")
    decode: str = Field("argmax", description="how its labels are decoded: argmax, or constrained (valid IOB2 only)")
    metrics: dict = {}
    error: str | None = Field(None, description="why it failed to load (a served adapter: why its replacement did)")


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME.pattern, description="the adapter's name in requests (replaces one of that name)")
    path: str = Field(description="absolute path of a loratag run or PEFT adapter folder under an --allow-root")


class AdaptersResponse(BaseModel):
    adapters: list[AdapterOut]


class Metrics:
    """The Prometheus series of one app (a registry of its own, so several apps in one process don't clash): HTTP
    requests by route; per adapter, tag requests by status, latency and words; the pool's stacked, served and
    failed adapters, loads (cold loads included) and their seconds, evictions."""

    KNOWN_PATHS = {"/v1/tag", "/v1/adapters", "/healthz", "/metrics", "/"}
    SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self, pool: AdapterPool | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("loratag_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.latency = Histogram(
            "loratag_request_seconds",
            "request latency",
            ["path"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_texts = Histogram(
            "loratag_batch_texts",
            "texts per forward batch",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.errors = Counter("loratag_errors", "requests answered with an error", ["status"], registry=self.registry)
        r = self.registry
        self.adapter_requests = Counter(
            "loratag_adapter_requests", "tag requests per adapter, by HTTP status", ["adapter", "status"], registry=r
        )
        self.adapter_seconds = Histogram(
            "loratag_adapter_request_seconds", "tag request latency per adapter", ["adapter"], buckets=self.SECONDS,
            registry=r,
        )  # fmt: skip
        self.adapter_words = Counter("loratag_adapter_words", "words tagged per adapter", ["adapter"], registry=r)
        self.loads = Counter("loratag_adapter_loads", "adapter loads (cold loads included)", registry=r)
        self.load_failures = Counter("loratag_adapter_load_failures", "adapters that failed to load", registry=r)
        self.load_seconds = Histogram(
            "loratag_adapter_load_seconds", "seconds to load an adapter", buckets=self.SECONDS, registry=r
        )
        self.evictions = Counter("loratag_adapter_evictions", "adapters evicted (--max-adapters)", registry=r)
        self.names = set(pool.adapters) if pool is not None else set()
        if pool is not None:
            Gauge("loratag_adapters_stacked", "adapters stacked now", registry=r).set_function(
                lambda: len(pool.resident())
            )
            Gauge("loratag_adapters_served", "adapters served", registry=r).set_function(lambda: len(pool.adapters))
            Gauge("loratag_adapters_failed", "adapters that failed to load", registry=r).set_function(
                lambda: len(pool.failed)
            )
            pool.listeners.append(self.pool_event)

    def pool_event(self, event: str, name: str, seconds: float) -> None:
        self.names.add(name)  # names the operator gave (runs, admin API), not ones a client made up
        if event == "load":
            self.loads.inc()
            self.load_seconds.observe(seconds)
        elif event == "evict":
            self.evictions.inc()
        elif event == "fail":
            self.load_failures.inc()

    def tagged(self, adapter: str, status: int, seconds: float, words: int) -> None:
        self.adapter_requests.labels(adapter, str(status)).inc()
        self.adapter_seconds.labels(adapter).observe(seconds)
        if status == 200:
            self.adapter_words.labels(adapter).inc(words)

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = "/v1/adapters" if path.startswith("/v1/adapters/") else path
        path = path if path in self.KNOWN_PATHS else "other"
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)
        if status >= 400:
            self.errors.labels(str(status)).inc()

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def _within_limits(req: TagRequest, settings: ServeSettings) -> list[str]:
    """The request's texts, or the HTTP error (422, 413) that names the limit they exceed."""
    from fastapi import HTTPException

    texts = [req.text] if req.text is not None else req.texts
    if req.texts is not None and not 1 <= len(texts) <= settings.max_texts:
        msg = f"'texts' must hold 1 to {settings.max_texts} texts"
        raise HTTPException(422, [{"loc": ["body", "texts"], "msg": msg, "type": "value_error"}])
    for i, t in enumerate(texts):
        if len(t) > settings.max_text_chars:
            raise HTTPException(
                413, f"text {i} has {len(t)} characters; the limit is {settings.max_text_chars} (--max-text-chars)"
            )
    return texts


def _describe(a, status: str = "ready", error: str | None = None) -> dict:
    return {
        "name": a.name, "status": status, "labels": list(a.labels.labels), "bias": a.bias, "decode": a.decode,
        "metrics": a.metrics, "error": error,
    }  # fmt: skip


def _listing(pool: AdapterPool) -> list[dict]:
    resident, failed = set(pool.resident()) if not pool.merged else set(pool.adapters), dict(pool.failed)
    out = []
    for name, a in pool.adapters.items():
        error = failed[name].error if name in failed else None
        out.append(_describe(a, "ready" if name in resident else "idle", error))
    out += [{"name": n, "status": "failed", "error": f.error} for n, f in failed.items() if n not in pool.adapters]
    return out


def allowed_path(path: str, roots: list[Path]) -> Path:
    """``path`` (absolute) if it and the adapter files in it lie under one of ``roots`` once links are resolved;
    else HTTP 403 (outside) or 404 (not there)."""
    from fastapi import HTTPException

    if not roots:
        raise HTTPException(403, "the admin API is off: start the server with --allow-root DIR")
    p = Path(path)
    if not p.is_absolute():
        raise HTTPException(422, f"path must be absolute, got {path!r}")
    try:
        real = p.resolve()
        inside = [r.resolve() for r in roots]
        files = [real, *(real / "adapter").resolve().glob("*"), *real.glob("*")] if real.is_dir() else [real]
        outside = not all(any(f.resolve().is_relative_to(r) for r in inside) for f in files)
    except (OSError, ValueError) as e:  # a NUL byte, a name too long, a loop of links
        raise HTTPException(422, f"path {path!r} cannot be used: {e}") from None
    if outside:
        raise HTTPException(403, f"{path} is not under an --allow-root folder (links resolved)")
    if not real.is_dir():
        raise HTTPException(404, f"{path}: no such run or adapter folder")
    return real


def create_app(
    pool: AdapterPool,
    settings: ServeSettings = ServeSettings(),
    user_keys: list[str] = (),
    admin_keys: list[str] = (),
    allow_roots: list[Path] = (),
    watcher=None,
):
    """The ASGI application, wrapped in its middlewares, and the FastAPI app inside (tests call it in-process).
    The worker threads start with the first request and stop when the app shuts down (ASGI lifespan), as does
    ``watcher`` (serve.watch.Watcher). ``user_keys``/``admin_keys``: bearer keys (asgi.Auth); ``allow_roots``:
    folders the admin API may add adapters from (none: POST /v1/adapters is off)."""
    from fastapi import FastAPI, HTTPException, Response
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    metrics = Metrics(pool)
    batcher = Batcher(
        lambda adapters, texts: pool.tag(adapters, texts),  # looked up per batch: tests replace pool.tag
        settings.wait_ms if settings.batching else 0,
        settings.max_batch_texts,
        settings.max_queue,
        settings.batching,
        on_batch=metrics.batch_texts.observe,
        workers=settings.workers,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        await asyncio.to_thread(batcher.close)

    app = FastAPI(
        title="loratag",
        version="v1",
        description="Token classification (NER) with many LoRA adapters on one base model.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        # FastAPI's own handler echoes the input as UTF-8 JSON and fails (500) on the lone surrogate it refuses;
        # ASCII-escaped JSON carries any string
        body = json.dumps({"detail": jsonable_encoder(exc.errors())}, ensure_ascii=True)
        return Response(body, status_code=422, media_type="application/json")

    @app.post(
        "/v1/tag",
        response_model=TagResponse,
        responses={
            404: {"description": "unknown adapter"},
            413: {"description": "body, text or request too large (bytes, characters, words)"},
            422: {"description": "malformed request; the detail names the field"},
            503: {"description": "queue full; retry after the Retry-After seconds"},
        },
    )
    async def tag(req: TagRequest):
        """Entities of each text (`text`, `label`, `start`, `end`, `score`), as `loratag predict` gives them."""
        start, status, words = time.perf_counter(), 500, 0
        # per-adapter series only for names the server knows: a client cannot grow them without bound
        series = req.adapter if req.adapter in metrics.names else "unknown"
        try:
            if req.adapter not in pool.adapters:
                raise HTTPException(
                    404, str(UnknownAdapter(req.adapter, list(pool.adapters), pool.failed.get(req.adapter)))
                )
            texts = _within_limits(req, settings)
            words = await asyncio.to_thread(lambda: sum(count_words(t) for t in texts))
            if words > settings.max_words:
                raise HTTPException(
                    413, f"{words} words in this request; the limit is {settings.max_words} (--max-words)"
                )
            try:
                docs = await batcher.submit(req.adapter, texts)
            except QueueFull:
                raise HTTPException(503, "the server is busy; retry shortly", headers={"Retry-After": "1"}) from None
            except UnknownAdapter as e:  # removed, or failed to load, after the request came in
                raise HTTPException(404, str(e)) from None
            status = 200
            # A ready response: FastAPI would otherwise validate the dicts again against TagResponse (the schema
            # still documents it), a cost paid per request in the event loop every other request waits on.
            return JSONResponse({"adapter": req.adapter, "results": [d.to_dict() for d in docs]})
        except HTTPException as e:
            status = e.status_code
            raise
        finally:
            metrics.tagged(series, status, time.perf_counter() - start, words)

    @app.get("/v1/adapters", response_model=AdaptersResponse)
    async def adapters():
        """The adapters this server knows: their status (ready, idle, failed), labels, which biases they trained,
        their test metrics, and the error of any that failed to load."""
        return {"adapters": _listing(pool)}

    admin = {403: {"description": "not an admin key, or no --allow-root"}, 401: {"description": "no or wrong key"}}

    @app.post(
        "/v1/adapters",
        status_code=201,
        response_model=AdapterOut,
        responses={**admin, 404: {"description": "no such folder"}, 422: {"description": "it failed to load"}},
    )
    async def add_adapter(req: AddAdapter):
        """Serve the run or PEFT adapter at `path` (under an --allow-root folder; safetensors only) as `name`,
        replacing one of that name once the new one has loaded. A load that fails changes nothing else."""
        path = await asyncio.to_thread(allowed_path, req.path, list(allow_roots))
        if pool.merged:
            raise HTTPException(409, "this server serves one merged adapter (int8, or not stackable): fixed at start")
        try:
            adapter = await asyncio.to_thread(pool.add, req.name, path)
        except Exception as e:
            raise HTTPException(422, f"{req.name} failed to load: {type(e).__name__}: {e}") from None
        return _describe(adapter, "ready" if req.name in pool.resident() else "idle")

    @app.delete("/v1/adapters/{name}", status_code=204, responses={**admin, 404: {"description": "unknown adapter"}})
    async def remove_adapter(name: str):
        """Stop serving `name`; requests already in a batch are answered first."""
        if not allow_roots:
            raise HTTPException(403, "the admin API is off: start the server with --allow-root DIR")
        if pool.merged:
            raise HTTPException(409, "this server serves one merged adapter (int8, or not stackable): fixed at start")
        if not await asyncio.to_thread(pool.remove, name):
            raise HTTPException(404, f"unknown adapter {name!r}")
        return Response(status_code=204)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "adapters": len(pool.adapters)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        """Prometheus text format: requests, latency, batch sizes, errors."""
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return (Path(__file__).parent / "page.html").read_text(encoding="utf-8")

    limited = BodyLimit(app, settings.max_body_bytes, settings.drain_body_bytes)
    wrapped = Observe(Auth(limited, list(user_keys), list(admin_keys)), metrics.observe)
    return wrapped, app


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(pool: AdapterPool) -> int:
    """Two worker threads on a CPU with two cores or more (each then runs its own batch on its share of the cores,
    which tagged more sentences/s than one worker on all of them: docs/serving.md); one on a GPU, and for an int8
    model (ONNX Runtime's own thread pool spans the cores)."""
    if pool.tagger.device.type != "cpu" or pool.tagger.quantized:
        return 1
    return min(2, cpu_cores())


def share_cores(pool: AdapterPool, workers: int) -> None:
    """On the CPU, each worker gets an equal share of the cores as torch threads. Process-wide, so called by
    ``run`` and not by create_app, which tests call in their own process."""
    import torch

    if pool.tagger.device.type == "cpu":
        torch.set_num_threads(max(1, cpu_cores() // workers))


def serve(pool: AdapterPool, host: str, port: int, settings: ServeSettings, **app_kw) -> None:
    """Serve until interrupted (``app_kw``: create_app's keys, allowed roots and watcher)."""
    import torch
    import uvicorn

    share_cores(pool, settings.workers)
    log.info("%d worker(s), %d torch thread(s) each", settings.workers, torch.get_num_threads())
    if host not in ("127.0.0.1", "localhost", "::1") and not app_kw.get("user_keys"):
        log.warning("serving on %s without an API key: anyone who reaches the port can use every adapter "
                    "(set LORATAG_API_KEY or --api-key-file)", host)  # fmt: skip
    wrapped, _ = create_app(pool, settings, **app_kw)
    uvicorn.run(wrapped, host=host, port=port, log_level="info")
