"""`loratag serve`: its flags (the limits' flags and defaults come from settings.py: ServeSettings) and the command."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..cliargs import adapter_flags, device_flag, precision_flag, quantize_flag
from ..config import option_fields
from .settings import ServeSettings

USER_KEY, ADMIN_KEY = "LORATAG_API_KEY", "LORATAG_ADMIN_KEY"
MIN_KEY = 16


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        parents=[adapter_flags(), precision_flag(), quantize_flag(), device_flag()],
        help="serve many adapters on one base model over HTTP (FastAPI)",
        description="Loads every run's adapter onto one shared base model and answers POST /v1/tag, "
        "GET /v1/adapters, /healthz, /metrics (Prometheus) and a web page at /. Concurrent requests are "
        "batched across adapters, whatever their label sets. Adapters come and go without a restart: "
        "--runs-dir D --watch serves runs as they appear in D; --allow-root opens POST /v1/adapters and "
        "DELETE /v1/adapters/NAME. Keys: set LORATAG_API_KEY (or --api-key-file) and /v1/* needs "
        "'Authorization: Bearer KEY'; LORATAG_ADMIN_KEY (or --admin-key-file) for the admin routes. "
        "Needs the serve extra: pip install 'loratag[serve]'.",
    )
    p.add_argument("runs", nargs="*", help="run directories; RUN:NAME names the adapter [default: the folder name]")
    p.add_argument("--runs-dir", type=Path, help="serve every run directory in this folder")
    p.add_argument(
        "--watch",
        action="store_true",
        help="keep watching --runs-dir: runs that appear are served (once complete: a finished run, or a "
        "whole adapter), changed ones replaced, removed ones dropped, without a restart",
    )
    p.add_argument("--watch-interval", type=float, default=1.0, metavar="S", help="seconds between looks [default: 1]")
    p.add_argument(
        "--allow-root",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="the admin API may add adapters from under this folder (repeatable); without it the admin API is off",
    )
    p.add_argument(
        "--max-adapters",
        type=int,
        metavar="N",
        help="at most N adapters stacked at once; the others load on first use, evicting the least recently used",
    )
    p.add_argument("--pin", action="append", default=[], metavar="NAME", help="never evict this adapter (repeatable)")
    p.add_argument("--api-key-file", type=Path, help=f"user keys, one per line (besides ${USER_KEY})")
    p.add_argument("--admin-key-file", type=Path, help=f"admin keys, one per line (besides ${ADMIN_KEY})")
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


def load_keys(env: str, file: Path | None) -> list[str]:
    """Keys from the environment variable ``env`` and ``file`` (one per line; blank lines and # comments skipped).
    Never from the command line, where `ps` shows them."""
    keys = [os.environ[env].strip()] if os.environ.get(env, "").strip() else []
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"{file}: cannot read the key file: {e.strerror}") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise ValueError(f"{file}: no key in the file (one key per line)")
        keys += found
    for i, key in enumerate(keys):
        if len(key) < MIN_KEY or any(c.isspace() for c in key):
            where = f"${env}" if i == 0 and os.environ.get(env, "").strip() else str(file)
            raise ValueError(f"{where}: a key must be at least {MIN_KEY} characters, without spaces")
    return keys


def run(args) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("loratag serve needs FastAPI and uvicorn: pip install 'loratag[serve]'") from None
    from ..labels import LabelSet
    from .adapters import base_of, parse_runs
    from .app import default_workers, serve
    from .pool import AdapterPool
    from .watch import Watcher, fingerprint

    limits = {f.name: getattr(args, f"serve.{f.name}") for f in option_fields(ServeSettings)}
    workers = 1 if args.workers is None else args.workers  # checked here, chosen after the pool has loaded
    settings = ServeSettings(**limits, batching=not args.no_batching, workers=workers)
    keys = {
        "user_keys": load_keys(USER_KEY, args.api_key_file),
        "admin_keys": load_keys(ADMIN_KEY, args.admin_key_file),
    }
    if args.watch and args.runs_dir is None:
        raise ValueError("--watch watches --runs-dir: name the folder with --runs-dir DIR")
    if args.watch_interval <= 0:
        raise ValueError(f"--watch-interval must be > 0 seconds, got {args.watch_interval}")
    for root in args.allow_root:
        if not root.is_dir():
            raise FileNotFoundError(f"--allow-root {root} is not a directory")
    dynamic = args.watch or bool(args.allow_root) or args.max_adapters is not None
    if dynamic and args.quantize:
        raise ValueError(
            "--quantize int8 serves one merged adapter: it cannot take --watch, --allow-root or --max-adapters"
        )
    labels = LabelSet.load(args.labels) if args.labels else None
    ready = []
    if args.watch:  # runs ready now load at start (one that fails is listed, as later); the rest when ready
        if not args.runs_dir.is_dir():
            raise FileNotFoundError(f"--runs-dir {args.runs_dir} is not a directory")
        ready = [(p, p.name) for p in sorted(args.runs_dir.iterdir()) if p.is_dir() and fingerprint(p) is not None]
        runs = parse_runs(args.runs, None, allow_none=True)
    else:
        runs = parse_runs(args.runs, args.runs_dir)
    first_base = next((b for p, _ in ready if (b := base_of(p, labels)) is not None), None)
    pool = AdapterPool(
        runs, device=args.device, base=args.base, labels=labels, precision=args.precision, quantize=args.quantize,
        max_adapters=args.max_adapters, pins=tuple(args.pin), dynamic=dynamic, first_base=first_base,
    )  # fmt: skip
    for path, name in ready:
        try:
            pool.add(name, path)
        except Exception:  # listed by the pool with its error; the others load
            pass
    unknown_pins = [n for n in args.pin if n not in pool.adapters]
    if unknown_pins and not (args.watch or args.allow_root):
        raise ValueError(f"--pin {unknown_pins[0]}: no such adapter; served: {', '.join(pool.adapters)}")
    watcher = None
    if args.watch:
        watcher = Watcher(pool, args.runs_dir, args.watch_interval, {n: p for p, n in ready})
    settings = dataclasses.replace(settings, workers=args.workers or default_workers(pool))
    serve(pool, args.host, args.port, settings, allow_roots=args.allow_root, watcher=watcher, **keys)
