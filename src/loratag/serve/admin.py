"""The routes that list and change what `loratag serve` serves: GET /v1/adapters, and the admin API (POST
/v1/adapters, DELETE /v1/adapters/NAME), on only with --allow-root."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.
import asyncio
from pathlib import Path

from .pool import AdapterPool
from .schemas import AdapterOut, AdaptersResponse, AddAdapter


def adapter_json(a, status: str = "ready", error: str | None = None) -> dict:
    return {
        "name": a.name, "status": status, "labels": list(a.labels.labels), "bias": a.bias, "decode": a.decode,
        "context": a.context, "case": a.case, "metrics": a.metrics, "error": error,
    }  # fmt: skip


def listing(pool: AdapterPool) -> list[dict]:
    resident, failed = set(pool.resident()), dict(pool.failed)
    out = []
    for name, a in pool.adapters.items():
        error = failed[name].error if name in failed else None
        out.append(adapter_json(a, "ready" if name in resident else "idle", error))
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


def add_routes(app, pool: AdapterPool, allow_roots: list[Path]) -> None:
    """GET /v1/adapters, and the admin API over ``allow_roots`` (none: off, 403)."""
    from fastapi import HTTPException, Response

    @app.get("/v1/adapters", response_model=AdaptersResponse)
    async def adapters():
        """The adapters this server knows: their status (ready, idle, failed), labels, which biases they trained,
        their test metrics, and the error of any that failed to load."""
        return {"adapters": listing(pool)}

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
        return adapter_json(adapter, "ready" if req.name in pool.resident() else "idle")

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
