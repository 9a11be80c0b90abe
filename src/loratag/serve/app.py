"""`loratag serve`: the HTTP application (FastAPI + uvicorn, imported only here) over the adapter pool and batcher:
the tag route and its limits, the middlewares, running (schemas.py, metrics.py and admin.py hold the rest). The
settings' defaults live in settings.py (ServeSettings) only; the CLI reads its flags and defaults from there.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..text import count_words
from .adapters import UnknownAdapter
from .admin import add_routes
from .asgi import Auth, BodyLimit, Observe
from .batcher import Batcher, QueueFull
from .metrics import Metrics
from .pool import AdapterPool
from .schemas import TagRequest, TagResponse
from .settings import ServeSettings

log = logging.getLogger(__name__)


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


def add_tag_route(app, pool: AdapterPool, batcher: Batcher, settings: ServeSettings, metrics: Metrics) -> None:
    """POST /v1/tag: limits checked, the texts batched with other requests, per-adapter metrics kept."""
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse

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
            texts = _within_limits(req, settings)
            words = await asyncio.to_thread(lambda: sum(count_words(t) for t in texts))
            if words > settings.max_words:
                raise HTTPException(
                    413, f"{words} words in this request; the limit is {settings.max_words} (--max-words)"
                )
            try:
                with pool.hold(req.adapter):  # a removal waits for this request's answer
                    docs = await batcher.submit(req.adapter, texts)
            except QueueFull:
                raise HTTPException(503, "the server is busy; retry shortly", headers={"Retry-After": "1"}) from None
            except UnknownAdapter as e:  # not served, being removed, or failed to load when its batch ran
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
    from fastapi import FastAPI, Response
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, PlainTextResponse

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

    add_tag_route(app, pool, batcher, settings, metrics)
    add_routes(app, pool, list(allow_roots))

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


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads that allocate their own malloc arenas (up to 8 per core); a server whose worker threads
    load and drop adapters (--max-adapters) then keeps freed memory spread over many arenas and its RSS creeps up
    (docs/serving.md has the measurement). Two arenas keep it flat. Left alone where MALLOC_ARENA_MAX is set (glibc
    has read it) or the C library is not glibc. Process-wide, so called by ``serve`` only."""
    if os.environ.get("MALLOC_ARENA_MAX") or sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def serve(pool: AdapterPool, host: str, port: int, settings: ServeSettings, **app_kw) -> None:
    """Serve until interrupted (``app_kw``: create_app's keys, allowed roots and watcher)."""
    import torch
    import uvicorn

    share_cores(pool, settings.workers)
    limit_malloc_arenas()
    log.info("%d worker(s), %d torch thread(s) each", settings.workers, torch.get_num_threads())
    if host not in ("127.0.0.1", "localhost", "::1") and not app_kw.get("user_keys"):
        log.warning("serving on %s without an API key: anyone who reaches the port can use every adapter "
                    "(set LORATAG_API_KEY or --api-key-file)", host)  # fmt: skip
    wrapped, _ = create_app(pool, settings, **app_kw)
    uvicorn.run(wrapped, host=host, port=port, log_level="info")
