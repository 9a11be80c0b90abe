"""The adapter pool of `loratag serve`: one base model, many adapters, each row of a batch run with its own;
adapters added, replaced and removed while requests run, and at most ``max_adapters`` stacked at once (the least
recently used idle one evicted, loaded again on its next use).

Adapters with trained biases (bias "all" or "lora_only", the guide's setting) share the base too: PEFT would write
their biases into the base model in place (so it allows one such adapter), but here each adapter's bias values are
kept apart and applied per row by multilora.py; the base's own biases are never changed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..labels import LabelSet
from ..modeling import load_base, load_tokenizer, resolve_model
from ..precision import device_of
from ..tagger import TaggedDocument, Tagger
from . import multilora
from .adapters import Adapter, Failure, UnknownAdapter, describe, describe_runs, load_weights, share

log = logging.getLogger(__name__)


class AdapterPool:
    """One base model, N adapters; refuses at start what cannot share the base, naming the run and why. Adapters can
    be added, replaced and removed while it serves (``add``, ``remove``); passes in progress finish with the adapters
    they began with."""

    def __init__(
        self,
        runs: list[tuple[Path, str]],
        device: str | None = None,
        batch_size: int = 64,
        base: str | None = None,
        labels: LabelSet | None = None,
        precision: str = "auto",
        quantize: str | None = None,
        max_adapters: int | None = None,
        pins: tuple[str, ...] = (),
        dynamic: bool = False,
        first_base: str | None = None,
    ):
        """``base``: one base model for every adapter, instead of the one each names. ``labels``: the label order of
        plain PEFT adapters that carry none. ``quantize="int8"``: one adapter, merged into its base and run by ONNX
        Runtime in int8 (the path of predict --quantize int8); stacked adapters stay apart from the base, so int8
        cannot hold several. ``max_adapters``: at most this many stacked at once, the others loaded on first use;
        ``pins``: names never evicted. ``dynamic``: adapters will come and go (so an adapter that cannot be stacked
        is refused). ``first_base``: the base to load when ``runs`` is empty (the one later runs name)."""
        if quantize and len(runs) != 1:
            raise ValueError(
                f"--quantize int8 serves one adapter (merged into its base, exported to ONNX); {len(runs)} were "
                "given: run one server per adapter with --quantize int8, or serve them together in float"
            )
        if max_adapters is not None and max_adapters < 1:
            raise ValueError(f"--max-adapters must be at least 1, got {max_adapters}")
        self.labels, self.user_base, self.max_adapters = labels, base, max_adapters
        self.adapters: dict[str, Adapter] = {}  # served; replaced whole on every change, so readers may iterate
        self.failed: dict[str, Failure] = {}
        self.listeners: list = []  # f(event, name, seconds): "load", "evict", "fail"
        self._lock = threading.RLock()
        self._inflight = InFlight(self._lock)
        self._local = threading.local()
        described = describe_runs(runs, labels, base)
        if not described and base is None and first_base is None:
            raise ValueError("no run to serve yet: name the base model every run will share with --base")
        self.base_name = described[0][1] if described else resolve_model(base or first_base)
        self.merged = quantize is not None
        if self.merged:
            self._serve_merged(described[0][0], device, batch_size, precision, quantize)
            return
        labels0 = described[0][0].labels if described else LabelSet(("O",))  # the head is each adapter's own
        self._skeleton, self.model, self.tagger = shared_base(self.base_name, labels0, device, batch_size, precision)
        self._stacked = Stacked(self.model, max_adapters, set(pins))
        try:
            for adapter, _ in described:
                self._commit(adapter, self._load(adapter), keep={adapter.name})
        except multilora.Unstackable as e:
            if dynamic or len(described) > 1:
                raise ValueError(
                    f"{adapter.run}: cannot be stacked with other adapters ({e}); the server stacks plain LoRA on "
                    "Linear and Embedding layers. Serve it alone (merged into its base), without --watch, "
                    "--allow-root or --max-adapters"
                ) from e
            self._serve_merged(adapter, device, batch_size, precision, None)
            return
        kinds = ", ".join(f"{a.name} (bias {a.bias})" for a in self.adapters.values())
        log.info("serving %d adapter(s) on %s: %s", len(self.adapters), self.base_name, kinds)

    def _serve_merged(self, only: Adapter, device, batch_size: int, precision: str, quantize: str | None) -> None:
        """One adapter merged into its base (the path of predict): for int8 (ONNX Runtime), and for an adapter the
        stacked path does not cover (DoRA, ...). The adapter is fixed until the server stops."""
        kw = {"device": device, "batch_size": batch_size, "precision": precision, "base": self.user_base}
        self.tagger = Tagger.load(only.run, labels=self.labels, quantize=quantize, **kw)
        self.adapters, self.merged, self.model = {only.name: only}, True, None
        how = "in int8 (merged, ONNX Runtime)" if quantize else "merged into its base (it cannot be stacked)"
        log.info("serving %s on %s %s", only.name, self.base_name, how)

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self, a: Adapter) -> multilora.AdapterWeights:
        start = time.perf_counter()
        weights = load_weights(self._skeleton, a)
        self._emit("load", a.name, time.perf_counter() - start)
        return weights

    def _failure(self, name: str, path, error: Exception) -> None:
        log.warning("adapter %s (%s) failed to load: %s", name, path, error)
        with self._lock:
            self.failed[name] = Failure(str(path), f"{type(error).__name__}: {error}")
        self._emit("fail", name)

    def _changeable(self) -> None:
        if self.merged:
            raise ValueError("this server's one adapter is merged into its base (int8, or not stackable): fixed")

    def _emit(self, event: str, name: str, seconds: float = 0.0) -> None:
        for listener in self.listeners:
            listener(event, name, seconds)

    def _commit(self, adapter: Adapter, weights: multilora.AdapterWeights, keep: set[str]) -> None:
        """Serve ``adapter`` with ``weights`` (replacing one of the same name), evicting the least recently used
        adapters beyond ``max_adapters`` (not pinned, not in ``keep``): all or nothing."""
        with self._lock:
            adapters = {**self.adapters, adapter.name: adapter}
            victims = self._stacked.put(adapter.name, weights, keep, adapters)
            self.adapters = adapters
            self.failed.pop(adapter.name, None)
        for name in victims:
            log.info("evicted adapter %s (least recently used; --max-adapters %d)", name, self.max_adapters)
            self._emit("evict", name)

    # -- adapters that come and go ---------------------------------------------------------------------------

    def add(self, name: str, path: Path) -> Adapter:
        """Serve the run or adapter at ``path`` as ``name`` (replacing one of that name at once, after the new one
        has loaded). A failure is recorded (``failed``, listed by the server) and raised; nothing else changes."""
        self._changeable()
        try:
            adapter, needed = describe(Path(path), name, self.labels, self.user_base)
            if needed != self.base_name:
                raise ValueError(f"{path}: base model {needed!r}; this server's base is {self.base_name!r}")
            self._commit(adapter, self._load(adapter), keep={name})
        except Exception as e:
            self._failure(name, path, e)
            raise
        log.info("serving adapter %s from %s (bias %s, %d labels)", name, path, adapter.bias, len(adapter.labels))
        return adapter

    def hold(self, name: str):
        """A request for ``name`` in flight (from its acceptance to its answer; a context manager): ``remove`` waits
        for it. Raises UnknownAdapter where ``name`` is not served, or is being removed."""

        def admit():
            if name not in self.adapters or name in self._inflight.draining:
                raise UnknownAdapter(name, list(self.adapters), self.failed.get(name))

        return self._inflight.hold(name, admit)

    def remove(self, name: str, wait: float = 30.0) -> bool:
        """Stop serving ``name``: requests for it are refused from now on, those already accepted (``hold``) are
        answered first, for up to ``wait`` seconds. False if it was neither served nor failed."""
        self._changeable()
        with self._lock:
            if name in self.adapters and not self._inflight.drain(name, wait):
                log.warning("adapter %s removed with requests still in flight after %.0f s", name, wait)
            known = self.failed.pop(name, None) is not None
            if name in self.adapters:
                adapters = {n: a for n, a in self.adapters.items() if n != name}
                self._stacked.drop(name, adapters)
                self.adapters, known = adapters, True
        if known:
            log.info("stopped serving adapter %s", name)
        return known

    def resident(self) -> list[str]:
        """The stacked adapters, least recently used first."""
        with self._lock:
            return list(self._stacked.weights) if not self.merged else list(self.adapters)

    def _ready(self, names: set[str]) -> tuple[multilora.Stack, dict[str, Adapter]]:
        """A stack holding every adapter of ``names``, loading those evicted (a cold load: it fails that adapter
        alone, which is then listed as failed)."""
        while True:
            with self._lock:
                for n in names:
                    if n not in self.adapters:
                        raise UnknownAdapter(n, list(self.adapters), self.failed.get(n))
                missing = [n for n in names if n not in self._stacked.weights]
                if not missing:
                    return self._stacked.use(names)
                adapter = self.adapters[missing[0]]
            try:
                weights = self._load(adapter)
            except Exception as e:
                with self._lock:
                    if self.adapters.get(adapter.name) is adapter:  # no longer served: listed as failed
                        self.adapters = {n: a for n, a in self.adapters.items() if n != adapter.name}
                self._failure(adapter.name, adapter.run, e)
                raise UnknownAdapter(adapter.name, [], self.failed.get(adapter.name)) from e
            with self._lock:
                if self.adapters.get(adapter.name) is adapter:  # not replaced or removed meanwhile
                    self._commit(adapter, weights, keep=names)

    # -- tagging ---------------------------------------------------------------------------------------------

    def tag(self, adapters: list[str], texts: list[str]) -> list[TaggedDocument]:
        """One forward pass (in sorted batches) over texts of any adapters; threads may call it side by side.
        Raises UnknownAdapter for a name not served."""
        tagger, names = thread_copy(self.tagger, self._local), set(adapters)
        if self.merged:  # that one adapter already
            if names - set(self.adapters):
                raise UnknownAdapter(min(names - set(self.adapters)), list(self.adapters))
            return tagger.tag_documents(texts)
        if self.max_adapters and len(names) > self.max_adapters:  # more than may be stacked: a group at a time
            return in_groups(self.tag, adapters, texts, self.max_adapters)
        stack, served = self._ready(names)
        with self.model.pinned(stack):
            labels, decodes = [served[a].labels for a in adapters], [served[a].decode for a in adapters]
            context, case = [served[a].context for a in adapters], [served[a].case for a in adapters]
            return tagger.tag_documents(
                texts, adapters=adapters, label_sets=labels, decodes=decodes, context=context, case=case
            )


class Stacked:
    """Which adapters are stacked in the served model, least recently used first, at most ``limit`` (``pins`` never
    evicted); the stack and the adapters it was built for, replaced together. The pool's lock guards it."""

    def __init__(self, model: multilora.MultiLoraModel, limit: int | None, pins: set[str]):
        self.model, self.limit, self.pins = model, limit, pins
        self.weights: OrderedDict[str, multilora.AdapterWeights] = OrderedDict()
        self.snapshot: tuple[multilora.Stack | None, dict[str, Adapter]] = (None, {})

    def put(self, name: str, weights, keep: set[str], adapters: dict[str, Adapter]) -> list[str]:
        """Stack ``name`` (most recent), evicting beyond the limit what is not pinned or in ``keep``: the evicted."""
        stacked = OrderedDict((n, w) for n, w in self.weights.items() if n != name)
        stacked[name] = weights
        over = len(stacked) - self.limit if self.limit else 0
        victims = [n for n in stacked if n not in self.pins and n not in keep][: max(0, over)]
        self._install(OrderedDict((n, w) for n, w in stacked.items() if n not in victims), adapters)
        return victims

    def drop(self, name: str, adapters: dict[str, Adapter]) -> None:
        self._install(OrderedDict((n, w) for n, w in self.weights.items() if n != name), adapters)

    def use(self, names: set[str]) -> tuple[multilora.Stack, dict[str, Adapter]]:
        for n in names:
            self.weights.move_to_end(n)
        return self.snapshot

    def _install(self, stacked: OrderedDict, adapters: dict[str, Adapter]) -> None:
        """Build the stack first (it may raise Unstackable: nothing changed), then serve it."""
        names = list(stacked)
        stack = multilora.stack(names, list(stacked.values()), self.model.model) if names else None
        if stack is not None:
            self.model.install(stack)
        else:
            self.model.stack = None
        self.weights, self.snapshot = stacked, (stack, {n: adapters[n] for n in names})


class InFlight:
    """Requests accepted and not yet answered, by adapter, under the pool's lock; ``drain`` waits for an adapter's
    to end while refusing new ones."""

    def __init__(self, lock: threading.RLock):
        self.count: dict[str, int] = {}
        self.draining: set[str] = set()
        self._changed = threading.Condition(lock)

    @contextlib.contextmanager
    def hold(self, name: str, admit):
        with self._changed:
            admit()  # raises to refuse; checked under the same lock as drain
            self.count[name] = self.count.get(name, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                self.count[name] -= 1
                if not self.count[name]:
                    del self.count[name]
                    self._changed.notify_all()

    def drain(self, name: str, wait: float) -> bool:
        """Refuse new requests for ``name`` and wait up to ``wait`` s for those in flight; False on a timeout."""
        with self._changed:
            self.draining.add(name)
            try:
                return self._changed.wait_for(lambda: name not in self.count, timeout=wait)
            finally:
                self.draining.discard(name)


def shared_base(base: str, labels: LabelSet, device, batch_size: int, precision: str):
    """The base model every adapter shares: (a copy never wrapped, onto which adapters are loaded; the served
    model; its Tagger)."""
    model = load_base(base, labels).to(device_of(device)).eval().requires_grad_(False)
    skeleton = share(model)  # shares every tensor: no copy of the weights
    served = multilora.MultiLoraModel(model).eval()  # Tagger restores the mode it finds: eval, for threads
    kw = {"batch_size": batch_size, "device": device_of(device), "precision": precision}
    return skeleton, served, Tagger(served, load_tokenizer(base), labels, **kw)


def thread_copy(tagger: Tagger, local: threading.local) -> Tagger:
    """This thread's copy of ``tagger``: worker threads share the model but each gets its own tokenizer, since a
    fast tokenizer's Rust state is not safe to use from two threads at once ("Already borrowed")."""
    mine = getattr(local, "tagger", None)
    if mine is None or mine.model is not tagger.model:
        mine = copy.copy(tagger)
        mine.tokenizer = copy.deepcopy(tagger.tokenizer)
        local.tagger = mine
    return mine


def in_groups(tag, adapters: list[str], texts: list[str], size: int) -> list[TaggedDocument]:
    """``tag`` over the texts of ``size`` adapters at a time, the answers in the texts' order."""
    names = list(dict.fromkeys(adapters))
    out: list = [None] * len(texts)
    for i in range(0, len(names), size):
        group = set(names[i : i + size])
        rows = [j for j, a in enumerate(adapters) if a in group]
        for j, doc in zip(rows, tag([adapters[j] for j in rows], [texts[j] for j in rows])):
            out[j] = doc
    return out
