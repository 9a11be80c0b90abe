"""The adapter pool of `loratag serve`: one base model, many adapters, each row of a batch run with its own.

Adapters with trained biases (bias "all" or "lora_only", the guide's setting) share the base too: PEFT would write
their biases into the base model in place (so it allows one such adapter), but here each adapter's bias values are
kept apart and applied per row by multilora.py; the base's own biases are never changed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import threading
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


@dataclass
class Adapter:
    name: str
    run: Path
    labels: LabelSet
    metrics: dict = field(default_factory=dict)
    bias: str = "none"
    adapter_dir: Path | None = None
    decode: str = "argmax"  # the run's --decode (what it chose its epoch by); argmax for plain PEFT adapters


def parse_runs(specs: list[str], runs_dir: Path | None = None) -> list[tuple[Path, str]]:
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
    if not out:
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


def load_shared(adapters: list[Adapter], base_path: str):
    """One PEFT model holding every adapter's LoRA matrices (loaded as bias "none"), and, in the adapters' order,
    each adapter's trained biases and its classifier head (weight, bias), kept apart."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    base = load_base(base_path, adapters[0].labels)
    modules = {n for n, _ in base.named_modules()}  # PEFT wraps modules under their own names
    own_params = dict(base.named_parameters())  # by the base's own names, before PEFT wraps them
    model, biases, heads = None, [], []
    for a in adapters:
        cfg = PeftConfig.from_pretrained(str(a.adapter_dir))
        cfg.bias, cfg.inference_mode = "none", True  # its biases are applied per row, not written into the base
        peft_state, own, head = split_biases(load_file(a.adapter_dir / ADAPTER_WEIGHTS))
        weight = next((v for k, v in head.items() if k.endswith(".weight")), None)
        bias = next((v for k, v in head.items() if k.endswith(".bias")), None)
        if weight is None or bias is None or weight.shape[0] != len(a.labels):
            raise ValueError(f"{a.run}: the adapter file lacks a classifier head for its {len(a.labels)} labels")
        for key in head:  # PEFT expects its head copy filled: the base's own head, same for all; ours stays apart
            peft_state["base_model.model." + key] = own_params[key]
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=a.name)
        else:
            model.add_adapter(a.name, cfg)
        result = set_peft_model_state_dict(model, peft_state, adapter_name=a.name)
        mine = (f"lora_A.{a.name}.", f"lora_B.{a.name}.")
        missing = [k for k in result.missing_keys if any(m in k for m in mine)]
        if missing:
            raise ValueError(f"{a.run}: the adapter file lacks {len(missing)} weights, e.g. {missing[0]}")
        unknown = [m for m in own if m not in modules]
        if unknown:
            raise ValueError(f"{a.run}: biases for modules the base model does not have, e.g. {unknown[0]}")
        biases.append(own)
        heads.append((weight, bias))
    return model.eval(), biases, heads


@torch.no_grad()
def _load_heads(model, names: list[str], heads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    from peft.utils.other import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for name, (weight, bias) in zip(names, heads):
                module.modules_to_save[name].weight.copy_(weight)
                module.modules_to_save[name].bias.copy_(bias)


class AdapterPool:
    """One base model, N adapters; refuses at start what cannot share the base, naming the run and why."""

    def __init__(
        self,
        runs: list[tuple[Path, str]],
        device: str | None = None,
        batch_size: int = 64,
        base: str | None = None,
        labels: LabelSet | None = None,
        precision: str = "auto",
        quantize: str | None = None,
    ):
        """``base``: one base model for every adapter, instead of the one each names. ``labels``: the label order of
        plain PEFT adapters that carry none. ``quantize="int8"``: one adapter, merged into its base and run by ONNX
        Runtime in int8 (the path of predict --quantize int8); stacked adapters stay apart from the base, so int8
        cannot hold several."""
        if quantize and len(runs) != 1:
            raise ValueError(
                f"--quantize int8 serves one adapter (merged into its base, exported to ONNX); {len(runs)} were "
                "given: run one server per adapter with --quantize int8, or serve them together in float"
            )
        self.adapters: dict[str, Adapter] = {}
        base_name = None
        for path, name in runs:
            adapter, needed = _describe(Path(path), name, labels, base)
            if name in self.adapters:
                raise ValueError(f"{path}: adapter name {name!r} is used twice; name it with RUN:NAME")
            first = next(iter(self.adapters.values()), None)
            if first is None:
                base_name = needed
            elif needed != base_name:
                raise ValueError(f"{path}: base model {needed!r} differs from {first.run}'s; one server, one base")
            self.adapters[name] = adapter
        names = list(self.adapters)
        self.merged = quantize is not None
        if self.merged:
            only = self.adapters[names[0]]
            self.tagger = Tagger.load(
                only.run, labels=labels, device=device, quantize=quantize, base=base, batch_size=batch_size,
                precision=precision,
            )  # fmt: skip
            self.stacked, self._local, self._serial = True, threading.local(), contextlib.nullcontext()
            log.info("serving %s on %s in int8 (merged, ONNX Runtime)", only.name, base_name)
            return
        model, biases, heads = load_shared(list(self.adapters.values()), base_name)
        model = model.to(device_of(device))
        biases = [{k: v.to(device_of(device)) for k, v in b.items()} for b in biases]
        heads = [(w.to(device_of(device)), b.to(device_of(device))) for w, b in heads]
        # Stacked adapters (multilora.py): a mixed batch costs what a one-adapter batch costs, and each row gets
        # its own biases. PEFT's own per-adapter loop stays for what that does not cover (DoRA, LoRA on
        # embeddings, ...), but it has no per-adapter biases: adapters with trained biases need the stacked path.
        try:
            model = multilora.build(model, names, biases, heads)
            self.stacked = True
        except multilora.Unstackable as e:
            trained = [a for a, b in zip(self.adapters.values(), biases) if b]
            sizes = {len(a.labels) for a in self.adapters.values()}
            if len(sizes) > 1:
                raise ValueError(
                    f"adapters with different label counts ({', '.join(map(str, sorted(sizes)))}) are served only on "
                    f"the stacked path, which cannot take these: {e}"
                ) from None
            _load_heads(model, names, heads)  # PEFT's own path: its per-adapter copies of the (same-size) head
            if trained:
                raise ValueError(
                    f"{trained[0].run}: trained with bias={trained[0].bias!r}, served only with per-row biases, "
                    f"which cannot be applied here: {e}"
                ) from None
            log.info("adapters are not all plain LoRA on Linear layers (%s): PEFT's mixed-batch path is used", e)
            self.stacked = False
        first = self.adapters[names[0]]
        self.tagger = Tagger(
            model,
            load_tokenizer(base_name),
            first.labels,
            batch_size=batch_size,
            device=device_of(device),
            precision=precision,
        )
        self._local = threading.local()
        # PEFT's own mixed-batch path adds hooks to shared modules: one call at a time there
        self._serial = contextlib.nullcontext() if self.stacked else threading.Lock()
        kinds = ", ".join(f"{a.name} (bias {a.bias})" for a in self.adapters.values())
        log.info("serving %d adapter(s) on %s: %s", len(names), base_name, kinds)

    def _thread_tagger(self) -> Tagger:
        """Worker threads share the model but each gets its own tokenizer: a fast tokenizer's Rust state is
        not safe to use from two threads at once ("Already borrowed")."""
        tagger = getattr(self._local, "tagger", None)
        if tagger is None:
            tagger = copy.copy(self.tagger)
            tagger.tokenizer = copy.deepcopy(self.tagger.tokenizer)
            self._local.tagger = tagger
        return tagger

    def tag(self, adapters: list[str], texts: list[str]) -> list[TaggedDocument]:
        """One forward pass (in sorted batches) over texts of any adapters; threads may call it side by side
        (PEFT's own mixed-batch path then runs one call at a time)."""
        label_sets = [self.adapters[a].labels for a in adapters]
        decodes = [self.adapters[a].decode for a in adapters]
        with self._serial:
            tagger = self._thread_tagger()
            rows = None if self.merged else adapters  # a merged model is that one adapter already
            return tagger.tag_documents(texts, adapters=rows, label_sets=label_sets, decodes=decodes)
