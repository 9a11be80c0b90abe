"""Progress bars that suit both a terminal and a log file (tqdm, configured; stdlib + tqdm only)."""

from __future__ import annotations

import io
import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 15.0  # off a terminal: at most one progress line this often (plus the last)


class _Lines(io.TextIOBase):
    """tqdm redraws its bar in place with carriage returns; a log file keeps every redraw on one endless line
    (hundreds of KB for a short run). This writes each redraw as its own line instead, and drops tqdm's
    clearing writes (spaces between carriage returns)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0, stream=None, **kw) -> tqdm:
    """A tqdm bar on stderr. On a terminal it redraws in place and disappears when done; elsewhere (CI, nohup, a
    log file) it writes a plain line at most every ``LOG_INTERVAL_S`` seconds and a last line when it closes.
    ``kw``: more tqdm options (``unit_scale`` ...)."""
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False, file=stream, **kw)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        leave=True,
        file=_Lines(stream),
        mininterval=LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S * 4,
        ncols=100,
        ascii=True,
        **kw,
    )
