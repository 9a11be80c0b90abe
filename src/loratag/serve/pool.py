"""The adapter pool of `loratag serve`: one base model, many adapters, each row of a batch run with its own;
adapters added, replaced and removed while requests run, and at most ``max_adapters`` stacked at once (the least
recently used idle one evicted, loaded again on its next use).

Adapters with trained biases (bias "all" or "lora_only", the guide's setting) share the base too: PEFT would write
their biases into the base model in place (so it allows one such adapter), but here each adapter's bias values are
kept apart and applied per row by multilora.py; the base's own biases are never changed.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..labels import LabelSet
from ..modeling import load_base, load_tokenizer, resolve_model
from ..precision import device_of
from ..rundir import ADAPTER, ADAPTER_WEIGHTS, resolve_adapter
from ..tagger import TaggedDocument, Tagger
from . import multilora

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HEAD = ("classifier", "score")
PEFT_NAME = "served"


class UnknownAdapter(KeyError):
    """A request for an adapter this server does not serve (never added, removed, or failed to load)."""

    def __init__(self, name: str, known: list[str], failure: Failure | None = None):
        super().__init__(name)
        self.name, self.known, self.failure = name, known, failure

    def __str__(self) -> str:
        if self.failure is not None:
            return f"adapter {self.name!r} is not served: it failed to load: {self.failure.error}"
        return f"unknown adapter {self.name!r}; known: {', '.join(self.known) or 'none'}"


@dataclass(frozen=True)
class Failure:
    path: str
    error: str
    at: float = field(default_factory=time.time)


@dataclass
class Adapter:
    name: str
    run: Path
    labels: LabelSet
    metrics: dict = field(default_factory=dict)
    bias: str = "none"
    adapter_dir: Path | None = None
    decode: str = "argmax"  # the run's --decode (what it chose its epoch by); argmax for plain PEFT adapters


def parse_runs(specs: list[str], runs_dir: Path | None = None, allow_none: bool = False) -> list[tuple[Path, str]]:
    """``RUN`` or ``RUN:NAME`` arguments (and every run in ``runs_dir``) -> (path, adapter name)."""
    out = []
    if runs_dir is not None:
        if not runs_dir.is_dir():
            raise FileNotFoundError(f"--runs-dir {runs_dir} is not a directory")
        out += [(p, p.name) for p in sorted(runs_dir.iterdir()) if (p / ADAPTER).is_dir()]
        if not out:
            raise FileNotFoundError(f"--runs-dir {runs_dir}: no run directories (with adapter/) inside")
    for spec in specs:
        path, _, name = spec.partition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
        out.append((Path(path), name or Path(path).name))
    if not out and not allow_none:
        raise ValueError("name at least one run directory to serve (or --runs-dir)")
    return out


def _describe(path: Path, name: str, labels: LabelSet | None, base: str | None) -> tuple[Adapter, str]:
    """The adapter of a loratag run or a plain PEFT adapter folder (resolved as predict and evaluate resolve it), and
    the base model it needs."""
    if not NAME.match(name):
        raise ValueError(f"{path}: adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    ref = resolve_adapter(path, labels, base)
    if ref.peft_type != "LORA":
        raise ValueError(f"{path}: a {ref.peft_type} adapter; only LoRA adapters are served")
    adapter = Adapter(name, path, ref.labels, ref.metrics, ref.bias, ref.adapter_dir, ref.decode)
    return adapter, resolve_model(ref.base)


def base_of(path: Path, labels: LabelSet | None = None) -> str | None:
    """The base model a run or adapter needs, or None where it cannot be read."""
    try:
        return resolve_model(resolve_adapter(path, labels).base)
    except Exception:
        return None


def split_biases(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An adapter file's tensors -> (what PEFT loads: the LoRA matrices; the trained biases of the base's modules,
    by module name; the classifier head's own weight and bias). PEFT saves bias "all" / "lora_only" biases under the
    base model's own names (``base_model.model.bert...query.base_layer.bias``); loaded by PEFT they would overwrite
    the shared base. The head is kept apart too: adapters of one server may have heads of different sizes (their own
    label sets), which PEFT's copies of one base head cannot hold."""
    peft, biases, head = {}, {}, {}
    for key, value in state.items():
        name = key.removeprefix("base_model.model.")
        in_head = name.split(".")[0] in HEAD
        if in_head and (".modules_to_save." in name or ".original_module." in name):
            continue  # copies that bias "all" saves beside the head's own bias; PEFT ignores them on load too
        if in_head and "lora_" not in key:
            head[name] = value
        elif key.endswith(".bias") and "lora_" not in key:
            biases[name.removesuffix(".bias").replace(".base_layer", "")] = value
        else:
            peft[key] = value
    return peft, biases, head


def _share(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model`` (no tensor copied): PEFT
    wraps a copy's modules to load an adapter, while the served model goes on answering."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


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
        self.labels, self.user_base, self.max_adapters, self.pins = labels, base, max_adapters, set(pins)
        self.adapters: dict[str, Adapter] = {}  # served; replaced whole on every change, so readers may iterate
        self.failed: dict[str, Failure] = {}
        self.listeners: list = []  # f(event, name, seconds): "load", "evict", "fail"
        self._resident: OrderedDict[str, multilora.AdapterWeights] = OrderedDict()  # stacked, least recent first
        self._snapshot: tuple[multilora.Stack | None, dict[str, Adapter]] = (None, {})
        self._lock = threading.RLock()
        self._local = threading.local()
        described = []
        for path, name in runs:
            adapter, needed = _describe(Path(path), name, labels, base)
            if name in {a.name for a, _ in described}:
                raise ValueError(f"{path}: adapter name {name!r} is used twice; name it with RUN:NAME")
            if described and needed != described[0][1]:
                other = described[0][0].run
                raise ValueError(f"{path}: base model {needed!r} differs from {other}'s; one server, one base")
            described.append((adapter, needed))
        if not described and base is None and first_base is None:
            raise ValueError("no run to serve yet: name the base model every run will share with --base")
        self.base_name = described[0][1] if described else resolve_model(base or first_base)
        self.merged = quantize is not None
        if self.merged:
            self._serve_merged(described[0][0], device, batch_size, precision, quantize)
            return
        first_labels = described[0][0].labels if described else LabelSet(("O",))  # the head is each adapter's own
        model = load_base(self.base_name, first_labels).to(device_of(device)).eval().requires_grad_(False)
        self._skeleton = _share(model)  # never wrapped: each adapter is loaded onto a copy of it
        self.model = multilora.MultiLoraModel(model).eval()  # Tagger restores the mode it finds: eval, for threads
        self.tagger = Tagger(
            self.model, load_tokenizer(self.base_name), first_labels, batch_size=batch_size, device=device_of(device),
            precision=precision,
        )  # fmt: skip
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
        self.tagger = Tagger.load(
            only.run, labels=self.labels, device=device, quantize=quantize, base=self.user_base,
            batch_size=batch_size, precision=precision,
        )  # fmt: skip
        self.adapters, self.merged, self.model = {only.name: only}, True, None
        how = "in int8 (merged, ONNX Runtime)" if quantize else "merged into its base (it cannot be stacked)"
        log.info("serving %s on %s %s", only.name, self.base_name, how)

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self, a: Adapter) -> multilora.AdapterWeights:
        """One adapter's tensors, read through PEFT onto a copy of the base that shares its weights (so every PEFT
        rule of names and scaling applies), checked, then kept apart from any model."""
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        start = time.perf_counter()
        cfg = PeftConfig.from_pretrained(str(a.adapter_dir))
        cfg.bias, cfg.inference_mode = "none", True  # its biases are applied per row, not written into the base
        peft_state, own, head = split_biases(load_file(a.adapter_dir / ADAPTER_WEIGHTS))
        weight = next((v for k, v in head.items() if k.endswith(".weight")), None)
        bias = next((v for k, v in head.items() if k.endswith(".bias")), None)
        if weight is None or bias is None or weight.shape[0] != len(a.labels):
            raise ValueError(f"{a.run}: the adapter file lacks a classifier head for its {len(a.labels)} labels")
        own_params = dict(self._skeleton.named_parameters())
        for key in head:  # PEFT expects its head copy filled: the base's own head; the adapter's stays apart
            if key not in own_params:
                raise ValueError(f"{a.run}: a classifier head {key!r} the base model does not have")
            peft_state["base_model.model." + key] = own_params[key]
        unknown = [m for m in own if m not in dict(self._skeleton.named_modules())]
        if unknown:
            raise ValueError(f"{a.run}: biases for modules the base model does not have, e.g. {unknown[0]}")
        # one fixed PEFT name for the copy: a user's name may hold '.' (not a module key) or lie inside "lora_"
        model = get_peft_model(_share(self._skeleton), cfg, adapter_name=PEFT_NAME)
        result = set_peft_model_state_dict(model, peft_state, adapter_name=PEFT_NAME)
        mine = [f"{kind}.{PEFT_NAME}" for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")]
        missing = [k for k in result.missing_keys if any(m in k for m in mine)]
        if missing:
            raise ValueError(f"{a.run}: the adapter file lacks {len(missing)} weights, e.g. {missing[0]}")
        device = own_params[next(iter(head))].device
        weights = multilora.weights_of(
            model, PEFT_NAME, {k: v.to(device) for k, v in own.items()}, (weight.to(device), bias.to(device)), a.name
        )
        self._emit("load", a.name, time.perf_counter() - start)
        return weights

    def _emit(self, event: str, name: str, seconds: float = 0.0) -> None:
        for listener in self.listeners:
            listener(event, name, seconds)

    def _commit(self, adapter: Adapter, weights: multilora.AdapterWeights, keep: set[str]) -> None:
        """Serve ``adapter`` with ``weights`` (replacing one of the same name), evicting the least recently used
        adapters beyond ``max_adapters`` (not pinned, not in ``keep``): all or nothing."""
        with self._lock:
            resident = OrderedDict(self._resident)
            resident.pop(adapter.name, None)
            resident[adapter.name] = weights
            over = len(resident) - self.max_adapters if self.max_adapters else 0
            victims = [n for n in resident if n not in self.pins and n not in keep][: max(0, over)]
            for name in victims:
                del resident[name]
            adapters = {**self.adapters, adapter.name: adapter}
            self._install(resident, adapters)
            self.adapters = adapters
            self.failed.pop(adapter.name, None)
        for name in victims:
            log.info("evicted adapter %s (least recently used; --max-adapters %d)", name, self.max_adapters)
            self._emit("evict", name)

    def _install(self, resident: OrderedDict, adapters: dict[str, Adapter]) -> None:
        names = list(resident)
        stack = multilora.stack(names, list(resident.values()), self.model.model) if names else None
        if stack is not None:
            self.model.install(stack)
        else:
            self.model.stack = None
        self._resident, self._snapshot = resident, (stack, {n: adapters[n] for n in names})

    # -- adapters that come and go ---------------------------------------------------------------------------

    def add(self, name: str, path: Path) -> Adapter:
        """Serve the run or adapter at ``path`` as ``name`` (replacing one of that name at once, after the new one
        has loaded). A failure is recorded (``failed``, listed by the server) and raised; nothing else changes."""
        if self.merged:
            raise ValueError("this server's one adapter is merged into its base (int8, or not stackable): fixed")
        try:
            adapter, needed = _describe(Path(path), name, self.labels, self.user_base)
            if needed != self.base_name:
                raise ValueError(f"{path}: base model {needed!r}; this server's base is {self.base_name!r}")
            self._commit(adapter, self._load(adapter), keep={name})
        except Exception as e:
            log.warning("adapter %s (%s) failed to load: %s", name, path, e)
            with self._lock:
                self.failed[name] = Failure(str(path), f"{type(e).__name__}: {e}")
            self._emit("fail", name)
            raise
        log.info("serving adapter %s from %s (bias %s, %d labels)", name, path, adapter.bias, len(adapter.labels))
        return adapter

    def remove(self, name: str) -> bool:
        """Stop serving ``name`` (passes in progress finish with it); False if it was neither served nor failed."""
        if self.merged:
            raise ValueError("this server's one adapter is merged into its base (int8, or not stackable): fixed")
        with self._lock:
            known = self.failed.pop(name, None) is not None
            if name in self.adapters:
                adapters = {n: a for n, a in self.adapters.items() if n != name}
                self._install(OrderedDict((n, w) for n, w in self._resident.items() if n != name), adapters)
                self.adapters, known = adapters, True
        if known:
            log.info("stopped serving adapter %s", name)
        return known

    def resident(self) -> list[str]:
        """The stacked adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def _ready(self, names: set[str]) -> tuple[multilora.Stack, dict[str, Adapter]]:
        """A stack holding every adapter of ``names``, loading those evicted (a cold load: it fails that adapter
        alone, which is then listed as failed)."""
        while True:
            with self._lock:
                for n in names:
                    if n not in self.adapters:
                        raise UnknownAdapter(n, list(self.adapters), self.failed.get(n))
                missing = [n for n in names if n not in self._resident]
                if not missing:
                    for n in names:
                        self._resident.move_to_end(n)
                    return self._snapshot
                adapter = self.adapters[missing[0]]
            try:
                weights = self._load(adapter)
            except Exception as e:
                with self._lock:
                    if self.adapters.get(adapter.name) is adapter:
                        self.adapters = {n: a for n, a in self.adapters.items() if n != adapter.name}
                        self.failed[adapter.name] = Failure(str(adapter.run), f"{type(e).__name__}: {e}")
                self._emit("fail", adapter.name)
                raise UnknownAdapter(adapter.name, [], self.failed.get(adapter.name)) from e
            with self._lock:
                if self.adapters.get(adapter.name) is adapter:  # not replaced or removed meanwhile
                    self._commit(adapter, weights, keep=names)

    # -- tagging ---------------------------------------------------------------------------------------------

    def _thread_tagger(self) -> Tagger:
        """Worker threads share the model but each gets its own tokenizer: a fast tokenizer's Rust state is
        not safe to use from two threads at once ("Already borrowed")."""
        tagger = getattr(self._local, "tagger", None)
        if tagger is None or tagger.model is not self.tagger.model:
            tagger = copy.copy(self.tagger)
            tagger.tokenizer = copy.deepcopy(self.tagger.tokenizer)
            self._local.tagger = tagger
        return tagger

    def tag(self, adapters: list[str], texts: list[str]) -> list[TaggedDocument]:
        """One forward pass (in sorted batches) over texts of any adapters; threads may call it side by side.
        Raises UnknownAdapter for a name not served."""
        if self.merged:  # that one adapter already
            for n in adapters:
                if n not in self.adapters:
                    raise UnknownAdapter(n, list(self.adapters))
            return self._thread_tagger().tag_documents(texts)
        names = list(dict.fromkeys(adapters))
        cap = self.max_adapters or len(names)
        if len(names) > cap:  # more adapters than may be stacked: a batch per group of them
            out: list = [None] * len(texts)
            for i in range(0, len(names), cap):
                group = set(names[i : i + cap])
                rows = [j for j, a in enumerate(adapters) if a in group]
                for j, doc in zip(rows, self.tag([adapters[j] for j in rows], [texts[j] for j in rows])):
                    out[j] = doc
            return out
        stack, served = self._ready(set(names))
        with self.model.pinned(stack):
            return self._thread_tagger().tag_documents(
                texts,
                adapters=adapters,
                label_sets=[served[a].labels for a in adapters],
                decodes=[served[a].decode for a in adapters],
            )
