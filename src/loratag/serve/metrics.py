"""The Prometheus series of `loratag serve` (prometheus_client, imported only here and by the app)."""

from __future__ import annotations

from .pool import AdapterPool


class Metrics:
    """The Prometheus series of one app (a registry of its own, so several apps in one process don't clash): HTTP
    requests by route; per adapter, tag requests by status, latency and words; the pool's stacked, served and
    failed adapters, loads (cold loads included) and their seconds, evictions."""

    KNOWN_PATHS = {"/v1/tag", "/v1/adapters", "/healthz", "/metrics", "/"}
    SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self, pool: AdapterPool | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        r = self.registry
        self.adapter_requests = Counter(
            "loratag_adapter_requests", "tag requests per adapter, by HTTP status", ["adapter", "status"], registry=r
        )
        self.adapter_seconds = Histogram(
            "loratag_adapter_request_seconds", "tag request latency per adapter", ["adapter"], buckets=self.SECONDS,
            registry=r,
        )  # fmt: skip
        self.adapter_words = Counter("loratag_adapter_words", "words tagged per adapter", ["adapter"], registry=r)
        self.loads = Counter("loratag_adapter_loads", "adapter loads (cold loads included)", registry=r)
        self.load_failures = Counter("loratag_adapter_load_failures", "adapters that failed to load", registry=r)
        self.load_seconds = Histogram(
            "loratag_adapter_load_seconds", "seconds to load an adapter", buckets=self.SECONDS, registry=r
        )
        self.evictions = Counter("loratag_adapter_evictions", "adapters evicted (--max-adapters)", registry=r)
        self.names = set(pool.adapters) if pool is not None else set()
        if pool is not None:
            Gauge("loratag_adapters_stacked", "adapters stacked now", registry=r).set_function(
                lambda: len(pool.resident())
            )
            Gauge("loratag_adapters_served", "adapters served", registry=r).set_function(lambda: len(pool.adapters))
            Gauge("loratag_adapters_failed", "adapters that failed to load", registry=r).set_function(
                lambda: len(pool.failed)
            )
            pool.listeners.append(self.pool_event)

    def pool_event(self, event: str, name: str, seconds: float) -> None:
        self.names.add(name)  # names the operator gave (runs, admin API), not ones a client made up
        if event == "load":
            self.loads.inc()
            self.load_seconds.observe(seconds)
        elif event == "evict":
            self.evictions.inc()
        elif event == "fail":
            self.load_failures.inc()

    def tagged(self, adapter: str, status: int, seconds: float, words: int) -> None:
        self.adapter_requests.labels(adapter, str(status)).inc()
        self.adapter_seconds.labels(adapter).observe(seconds)
        if status == 200:
            self.adapter_words.labels(adapter).inc(words)

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = "/v1/adapters" if path.startswith("/v1/adapters/") else path
        path = path if path in self.KNOWN_PATHS else "other"
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)
        if status >= 400:
            self.errors.labels(str(status)).inc()

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
