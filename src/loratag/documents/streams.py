"""Input files as streams: bytes (gunzipped for .gz) and UTF-8 lines, so that readers hold one document at a time."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..data import DataError


def open_binary(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def lines_of(path: Path) -> Iterator[str]:
    """A text file's lines as UTF-8, one at a time; a bad byte names the file and its line."""
    try:
        with open_binary(path) as f:
            for n, raw in enumerate(f, 1):  # decoded line by line: a bad byte is known to its line
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = f"byte {raw[e.start]:#04x}"
                    raise DataError(f"{path}:{n}: not UTF-8 ({bad}); save the file as UTF-8") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
