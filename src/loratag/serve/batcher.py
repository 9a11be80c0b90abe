"""Gathering concurrent requests into shared forward passes, on worker threads that survive any request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time

log = logging.getLogger(__name__)
_STOP = object()


class QueueFull(Exception):
    pass


def _settle(fut: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Answer a request's future, unless its client went away (a cancelled future refuses an answer, and that
    refusal must not kill the worker thread)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Batcher:
    """Gathers concurrent requests for up to ``wait_ms`` (or ``max_texts`` texts) into one forward pass.

    ``workers`` threads own the model (shared, read-only); one of them at a time gathers a batch from the
    queue while the others run theirs, so a batch forms while the previous one computes. Requests wait on
    futures, so the event loop keeps answering (health, metrics, errors) while batches run. A batch that fails
    is retried request by request, so only the request that caused it fails. ``batching=False``: one request per
    forward pass (for comparison). Threads start with the first request and stop with ``close``.
    """

    def __init__(
        self,
        tag,
        wait_ms: float = 5.0,
        max_texts: int = 256,
        max_queue: int = 1024,
        batching: bool = True,
        on_batch=None,
        workers: int = 1,
    ):
        """``tag(adapters, texts) -> documents``: one forward pass over texts of any adapters."""
        self.tag, self.wait, self.max_texts, self.max_queue = tag, wait_ms / 1000, max_texts, max_queue
        self.batching = batching
        self.on_batch = on_batch or (lambda n: None)
        self.queue: queue.Queue = queue.Queue()
        self.gathering = threading.Lock()
        self.workers = max(1, workers)
        self.threads: list[threading.Thread] = []
        self._starting = threading.Lock()
        self.closed = False

    def start(self) -> None:
        with self._starting:
            if self.threads or self.closed:
                return
            self.threads = [
                threading.Thread(target=self._run, name=f"loratag-worker-{i}", daemon=True)
                for i in range(self.workers)
            ]
            for t in self.threads:
                t.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers after the batches they are running; requests still queued fail."""
        with self._starting:
            self.closed = True
            threads, self.threads = self.threads, []
        for _ in threads:
            self.queue.put(_STOP)
        for t in threads:
            t.join(timeout)
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                _settle(item[2], error=RuntimeError("the server is shutting down"))

    async def submit(self, adapter: str, texts: list[str]) -> list:
        if self.closed:
            raise RuntimeError("the server is shutting down")
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull
        self.start()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((adapter, texts, fut))
        return await asyncio.wrap_future(fut)

    def _take(self) -> list | None:
        with self.gathering:  # one gatherer at a time: two would split one burst into two small batches
            first = self.queue.get()
            if first is _STOP:
                return None
            taken = [first]
            n = len(first[1])
            deadline = time.monotonic() + self.wait
            while self.batching and n < self.max_texts:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    self.queue.put(_STOP)  # another worker's; this one finishes its batch first
                    break
                taken.append(item)
                n += len(item[1])
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            try:
                self._answer([t for t in taken if not t[2].cancelled()])
            except BaseException:  # nothing a request does may end a worker thread
                log.exception("worker: unexpected error")
                for _, _, fut in taken:
                    _settle(fut, error=RuntimeError("internal error"))

    def _answer(self, taken: list) -> None:
        if not taken:
            return
        adapters = [a for a, texts, _ in taken for _ in texts]
        texts = [t for _, ts, _ in taken for t in ts]
        self.on_batch(len(texts))
        try:
            docs = self.tag(adapters, texts)
        except Exception as e:
            if len(taken) == 1:
                log.warning("request failed: %s: %s", type(e).__name__, e)
                _settle(taken[0][2], error=e)
                return
            log.warning(
                "batch of %d requests failed (%s: %s); retrying them one by one", len(taken), type(e).__name__, e
            )
            for item in taken:
                self._answer([item])
            return
        i = 0
        for _, ts, fut in taken:
            _settle(fut, docs[i : i + len(ts)])
            i += len(ts)
