"""`loratag serve --runs-dir D --watch`: runs that appear in D are served, replaced ones switched, removed ones
dropped, without a restart.

A plain polling loop rather than inotify (watchdog): it works the same on network file systems and in containers
where change events do not arrive, and a scan of a folder of runs every second costs a few stat calls.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from ..rundir import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, LABELS, METRICS
from .pool import AdapterPool

log = logging.getLogger(__name__)


def complete_safetensors(path: Path) -> bool:
    """Whether a safetensors file is whole: its header parses and the file is as long as the header says (a
    file still being copied is shorter)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _json_ok(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def fingerprint(run: Path) -> tuple | None:
    """The size and modification time of every file a run's adapter is loaded from, or None while the run is not
    ready: a loratag run is ready once training has finished (metrics.json, written last) and its adapter and
    labels are whole; a plain PEFT adapter folder once its config and weights are whole."""
    adapter = run / ADAPTER if (run / ADAPTER).is_dir() else run
    needed = [adapter / ADAPTER_CONFIG, adapter / ADAPTER_WEIGHTS]
    if (run / CONFIG).is_file() and adapter != run:  # a loratag run
        needed += [run / CONFIG, run / LABELS, run / METRICS]
    elif (adapter / CONFIG).is_file():  # a plain adapter's labels (id2label) beside it
        needed.append(adapter / CONFIG)
    if not all(p.is_file() for p in needed):
        return None
    if not complete_safetensors(adapter / ADAPTER_WEIGHTS):
        return None
    if not all(_json_ok(p) for p in needed if p.suffix == ".json"):
        return None
    try:
        stats = [(str(p.relative_to(run)), p.stat()) for p in needed]
    except OSError:  # removed meanwhile
        return None
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


class Watcher:
    """Scans ``root`` every ``interval`` seconds. A run whose files are complete and unchanged over two scans is
    added (or, changed, replaced: the pool switches at once once the new one has loaded); one that fails is
    listed by the pool with its error and retried only when its files change; a run gone for two scans is removed
    (two, so that replacing a folder by delete-then-move does not drop it in between)."""

    def __init__(self, pool: AdapterPool, root: Path, interval: float = 1.0, served: dict[str, Path] | None = None):
        self.pool, self.root, self.interval = pool, Path(root), interval
        self.seen: dict[str, tuple] = {}  # name -> fingerprint acted on (served, or failed)
        self.pending: dict[str, tuple] = {}  # name -> fingerprint seen once, waiting for a second look
        self.missing: set[str] = set()  # served names not found in the last scan
        for name, path in (served or {}).items():
            fp = fingerprint(path)
            if fp is not None:
                self.seen[name] = fp
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan(self) -> None:
        """One look at the folder: add, replace and remove what is due."""
        present: dict[str, tuple] = {}
        try:
            entries = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as e:
            log.warning("--runs-dir %s cannot be read: %s", self.root, e)
            return
        for path in entries:
            fp = fingerprint(path)
            if fp is not None:
                present[path.name] = fp
            elif path.name in self.seen:
                present[path.name] = self.seen[path.name]  # being rewritten: the version served stays
        for name, fp in present.items():
            if self.seen.get(name) == fp:
                self.pending.pop(name, None)
                continue
            if self.pending.get(name) != fp:
                self.pending[name] = fp  # new or changed: wait one scan for the copy to settle
                continue
            del self.pending[name]
            self.seen[name] = fp
            try:
                self.pool.add(name, self.root / name)
            except Exception:  # recorded and listed by the pool; the other adapters are untouched
                pass
        for name in list(self.seen):
            if name in present:
                self.missing.discard(name)
            elif name in self.missing:
                self.missing.discard(name)
                del self.seen[name]
                self.pool.remove(name)
            else:
                self.missing.add(name)
        for name in list(self.pending):
            if name not in present:
                del self.pending[name]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception:  # the watch must outlive any one scan
                log.exception("--watch: scanning %s failed", self.root)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loratag-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
