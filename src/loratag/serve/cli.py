"""`loratag serve`: its flags (the limits' flags and defaults come from config.ServeSettings) and the command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..cliargs import adapter_flags, device_flag, precision_flag, quantize_flag
from ..config import ServeSettings, option_fields


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        parents=[adapter_flags(), precision_flag(), quantize_flag(), device_flag()],
        help="serve many adapters on one base model over HTTP (FastAPI)",
        description="Loads every run's adapter onto one shared base model and answers POST /v1/tag, "
        "GET /v1/adapters, /healthz, /metrics (Prometheus) and a web page at /. Concurrent requests are "
        "batched across adapters. Needs the serve extra: pip install 'loratag[serve]'.",
    )
    p.add_argument("runs", nargs="*", help="run directories; RUN:NAME names the adapter [default: the folder name]")
    p.add_argument("--runs-dir", type=Path, help="serve every run directory in this folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    for f in option_fields(ServeSettings):
        p.add_argument(
            f.metadata["flag"],
            dest=f"serve.{f.name}",
            type=type(f.default),
            default=f.default,
            metavar="MS" if f.name == "wait_ms" else "N",
            help=f"{f.metadata['help']} [default: {f.default}]",
        )
    p.add_argument("--no-batching", action="store_true", help="one request per forward pass (for comparison)")
    p.add_argument(
        "--workers",
        type=int,
        help="threads running forward passes side by side, the CPU cores shared among them "
        "[default: 2 on a CPU with 2+ cores, 1 on a GPU]",
    )
    p.set_defaults(run_command=run)


def run(args) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("loratag serve needs FastAPI and uvicorn: pip install 'loratag[serve]'") from None
    from ..labels import LabelSet
    from .app import default_workers, serve
    from .pool import AdapterPool, parse_runs

    limits = {f.name: getattr(args, f"serve.{f.name}") for f in option_fields(ServeSettings)}
    workers = 1 if args.workers is None else args.workers  # checked here, chosen after the pool has loaded
    settings = ServeSettings(**limits, batching=not args.no_batching, workers=workers)
    labels = LabelSet.load(args.labels) if args.labels else None
    runs = parse_runs(args.runs, args.runs_dir)
    pool = AdapterPool(
        runs, device=args.device, base=args.base, labels=labels, precision=args.precision, quantize=args.quantize
    )
    settings = dataclasses.replace(settings, workers=args.workers or default_workers(pool))
    serve(pool, args.host, args.port, settings)
