"""What `loratag serve` knows of an adapter before it serves it: its name and run, its label set and base, and its
tensors, read through PEFT without touching the served model."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..labels import LabelSet
from ..modeling import resolve_model
from ..rundir import ADAPTER, ADAPTER_WEIGHTS, resolve_adapter
from . import multilora

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


@dataclass
class Adapter:
    name: str
    run: Path
    labels: LabelSet
    metrics: dict = field(default_factory=dict)
    bias: str = "none"
    adapter_dir: Path | None = None
    decode: str = "argmax"  # the run's --decode (what it chose its epoch by); argmax for plain PEFT adapters
    context: int = 0  # the run's --context: each text's sentences are read with the text around them
    case: bool = False  # the run's --case: each word's case is read as its token type


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


def describe(path: Path, name: str, labels: LabelSet | None, base: str | None) -> tuple[Adapter, str]:
    """The adapter of a loratag run or a plain PEFT adapter folder (resolved as predict and evaluate resolve it), and
    the base model it needs."""
    if not NAME.match(name):
        raise ValueError(f"{path}: adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    ref = resolve_adapter(path, labels, base)
    if ref.peft_type != "LORA":
        raise ValueError(f"{path}: a {ref.peft_type} adapter; only LoRA adapters are served")
    adapter = Adapter(
        name, path, ref.labels, ref.metrics, ref.bias, ref.adapter_dir, ref.decode, ref.context, ref.case
    )
    return adapter, resolve_model(ref.base)


def describe_runs(
    runs: list[tuple[Path, str]], labels: LabelSet | None, base: str | None
) -> list[tuple[Adapter, str]]:
    """Every run described, with the base it needs; refuses a name used twice and runs that need different bases."""
    described: list[tuple[Adapter, str]] = []
    for path, name in runs:
        adapter, needed = describe(Path(path), name, labels, base)
        if name in {a.name for a, _ in described}:
            raise ValueError(f"{path}: adapter name {name!r} is used twice; name it with RUN:NAME")
        if described and needed != described[0][1]:
            other = described[0][0].run
            raise ValueError(f"{path}: base model {needed!r} differs from {other}'s; one server, one base")
        described.append((adapter, needed))
    return described


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


def share(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model`` (no tensor copied): PEFT
    wraps a copy's modules to load an adapter, while the served model goes on answering."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def load_weights(skeleton: torch.nn.Module, a: Adapter) -> multilora.AdapterWeights:
    """One adapter's tensors, read through PEFT onto a copy of ``skeleton`` (the base, never wrapped) that shares its
    weights (so every PEFT rule of names and scaling applies), checked, then kept apart from any model."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = PeftConfig.from_pretrained(str(a.adapter_dir))
    cfg.bias, cfg.inference_mode = "none", True  # its biases are applied per row, not written into the base
    peft_state, own, head = split_biases(load_file(a.adapter_dir / ADAPTER_WEIGHTS))
    weight = next((v for k, v in head.items() if k.endswith(".weight")), None)
    bias = next((v for k, v in head.items() if k.endswith(".bias")), None)
    if weight is None or bias is None or weight.shape[0] != len(a.labels):
        raise ValueError(f"{a.run}: the adapter file lacks a classifier head for its {len(a.labels)} labels")
    own_params = dict(skeleton.named_parameters())
    for key in head:  # PEFT expects its head copy filled: the base's own head; the adapter's stays apart
        if key not in own_params:
            raise ValueError(f"{a.run}: a classifier head {key!r} the base model does not have")
        peft_state["base_model.model." + key] = own_params[key]
    modules = {name for name, _ in skeleton.named_modules()}
    unknown = [m for m in own if m not in modules]
    if unknown:
        raise ValueError(f"{a.run}: biases for modules the base model does not have, e.g. {unknown[0]}")
    # one fixed PEFT name for the copy: a user's name may hold '.' (not a module key) or lie inside "lora_"
    model = get_peft_model(share(skeleton), cfg, adapter_name=PEFT_NAME)
    result = set_peft_model_state_dict(model, peft_state, adapter_name=PEFT_NAME)
    mine = [f"{kind}.{PEFT_NAME}" for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")]
    missing = [k for k in result.missing_keys if any(m in k for m in mine)]
    if missing:
        raise ValueError(f"{a.run}: the adapter file lacks {len(missing)} weights, e.g. {missing[0]}")
    device = own_params[next(iter(head))].device
    return multilora.weights_of(
        model, PEFT_NAME, {k: v.to(device) for k, v in own.items()}, (weight.to(device), bias.to(device)), a.name
    )
