"""The settings of `loratag serve`: every limit and knob, with its default and CLI flag (its own module: a server's
settings are not part of a run's saved config)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import _opt, option_fields


@dataclass(frozen=True)
class ServeSettings:
    """Every limit and knob of `loratag serve`, with its default and the CLI flag that sets it."""

    wait_ms: float = _opt(5.0, "--batch-wait-ms", "how long a worker gathers requests into one batch, in ms")
    max_batch_texts: int = _opt(256, "--max-batch-texts", "texts per forward batch at most")
    max_queue: int = _opt(1024, "--max-queue", "queued requests (>= 1) before answering 503 with Retry-After")
    max_body_bytes: int = _opt(1 << 20, "--max-body-bytes", "request body size limit (413 over it)")
    drain_body_bytes: int = _opt(
        32 << 20,
        "--drain-body-bytes",
        "an over-limit body is read and discarded up to this size before the 413, so that clients that send "
        "their whole body first (urllib, ...) read the 413 instead of a reset connection",
    )
    max_text_chars: int = _opt(100_000, "--max-text-chars", "characters per text at most (413 over it)")
    max_texts: int = _opt(256, "--max-texts", "texts per request at most (422 over it)")
    max_words: int = _opt(
        20_000,
        "--max-words",
        "words per request at most, counted as the word splitter counts them (413 over it): caps the work "
        "one request can ask for (a 1 MiB body of '(((' is ~1M words)",
    )
    batching: bool = True
    workers: int = 1

    def __post_init__(self) -> None:
        for f in option_fields(ServeSettings):
            value = getattr(self, f.name)
            least = 0 if f.name == "wait_ms" else 1  # a queue of 0 would answer every request 503
            if value < least:
                raise ValueError(f"{f.metadata['flag']} must be >= {least}, got {value}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
