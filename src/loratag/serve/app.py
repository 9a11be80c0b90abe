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
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from ..config import ServeSettings
from ..text import count_words
from .asgi import BodyLimit, Observe
from .batcher import Batcher, QueueFull
from .pool import AdapterPool

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
    labels: list[str]
    bias: str = Field(description="which biases the adapter trained: none, all or lora_only")
    decode: str = Field(description="how its labels are decoded: argmax, or constrained (valid IOB2 only)")
    metrics: dict


class AdaptersResponse(BaseModel):
    adapters: list[AdapterOut]


class Metrics:
    """The Prometheus series of one app (a registry of its own, so several apps in one process don't clash)."""

    KNOWN_PATHS = {"/v1/tag", "/v1/adapters", "/healthz", "/metrics", "/"}

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

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

    def observe(self, path: str, status: int, seconds: float) -> None:
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


def _describe(a) -> dict:
    return {"name": a.name, "labels": list(a.labels.labels), "bias": a.bias, "decode": a.decode, "metrics": a.metrics}


def create_app(pool: AdapterPool, settings: ServeSettings = ServeSettings()):
    """The ASGI application, wrapped in its middlewares, and the FastAPI app inside (tests call it in-process).
    The worker threads start with the first request and stop when the app shuts down (ASGI lifespan)."""
    from fastapi import FastAPI, HTTPException, Response
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    metrics = Metrics()
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
        yield
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
        if req.adapter not in pool.adapters:
            raise HTTPException(404, f"unknown adapter {req.adapter!r}; known: {', '.join(pool.adapters)}")
        texts = _within_limits(req, settings)
        words = await asyncio.to_thread(lambda: sum(count_words(t) for t in texts))
        if words > settings.max_words:
            raise HTTPException(413, f"{words} words in this request; the limit is {settings.max_words} (--max-words)")
        try:
            docs = await batcher.submit(req.adapter, texts)
        except QueueFull:
            raise HTTPException(503, "the server is busy; retry shortly", headers={"Retry-After": "1"}) from None
        # A ready response: FastAPI would otherwise validate the dicts again against TagResponse (the schema
        # still documents it), a cost paid per request in the event loop every other request waits on.
        return JSONResponse({"adapter": req.adapter, "results": [d.to_dict() for d in docs]})

    @app.get("/v1/adapters", response_model=AdaptersResponse)
    async def adapters():
        """The adapters this server holds, their labels, which biases they trained, and their test metrics."""
        return {"adapters": [_describe(a) for a in pool.adapters.values()]}

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

    wrapped = Observe(BodyLimit(app, settings.max_body_bytes, settings.drain_body_bytes), metrics.observe)
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


def serve(pool: AdapterPool, host: str, port: int, settings: ServeSettings) -> None:
    """Serve until interrupted."""
    import torch
    import uvicorn

    share_cores(pool, settings.workers)
    log.info("%d worker(s), %d torch thread(s) each", settings.workers, torch.get_num_threads())
    wrapped, _ = create_app(pool, settings)
    uvicorn.run(wrapped, host=host, port=port, log_level="info")
