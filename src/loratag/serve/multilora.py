"""Many LoRA adapters in one batch, one adapter per row, by gathered batched matmuls; adapters that come and go.

PEFT runs a mixed-adapter batch (``adapter_names``) as a Python loop over the adapters present in every LoRA
layer and classifier head: index the rows of one adapter, run its A and B, scatter the result back: a few small ops
per adapter per layer, so a mixed batch runs well below a one-adapter batch on a CPU (docs/serving.md has the
measurements). Here every adapter's A and B are stacked (``A: (adapters, r, in)``, ``B: (adapters, out, r)``,
scaling folded into B, ranks zero-padded to the largest), and a layer gathers each row's matrices and runs two
``bmm``: the same few ops for any number of adapters (the "BGMV" idea of multi-LoRA LLM servers, which no library
offers for encoder classifiers). The base weights stay shared and unmerged, so the answer of a row depends only on
its own adapter, as in PEFT.

Adapters trained with bias "all" or "lora_only" change the base model's own biases (Linear and LayerNorm). PEFT
writes them into the shared base (so it allows one such adapter); here each module whose bias some adapter trained
holds a stacked ``(adapters, features)`` bias and adds each row's own, the base's weights and biases untouched.
Classifier heads are stacked too, zero-padded to the widest, so adapters with different label sets share a batch;
and tables trained whole (``--case``: the token-type table), each row reading its own adapter's (or the base's).

The stacked tensors of one set of adapters form a ``Stack``, immutable once built. A forward pass reads the stack
it started with (the model's current one, or one pinned for the thread), so a server can add, replace and remove
adapters between passes (``MultiLoraModel.install``) while passes run: none ever mixes two sets.

Written by hand for those reasons; ``weights_of`` raises Unstackable for anything beyond plain LoRA on Linear and
Embedding layers, Linear classifier heads, Embedding tables trained whole and biases of Linear / LayerNorm modules
(DoRA, LoRA's own lora_bias, variants, convolutions), and callers then keep PEFT's own mixed-batch path.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


class Unstackable(ValueError):
    """The adapters hold something the stacked path does not cover; the message says what."""


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's tensors, by the base model's own module names."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # Linear: A (r, in), sB (out, r)
    embed: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # A (r, vocab), sB (dim, r)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # trained biases of the base's modules
    head: tuple[str, torch.Tensor, torch.Tensor] | None = None  # (module, weight, bias) of its classifier
    tables: dict[str, torch.Tensor] = field(default_factory=dict)  # Embedding tables trained whole: (rows, dim)

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in (*self.lora.values(), *self.embed.values()) for t in pair]
        tensors += list(self.biases.values()) + (list(self.head[1:]) if self.head else []) + list(self.tables.values())
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Stack:
    """The stacked tensors of a set of adapters (row ``index[name]`` of every tensor is that adapter's)."""

    names: tuple[str, ...]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (adapters, r, in), (adapters, out, r)
    embed: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (adapters, vocab, r), (adapters, dim, r)
    biases: dict[str, torch.Tensor]  # (adapters, features)
    head: tuple[str, torch.Tensor, torch.Tensor] | None  # module, (adapters, labels, hidden), (adapters, labels)
    tables: dict[str, torch.Tensor] = field(default_factory=dict)  # (adapters, rows, dim)

    @property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def modules(self) -> set[str]:
        head = {self.head[0]} if self.head else set()
        return set(self.lora) | set(self.embed) | set(self.biases) | set(self.tables) | head


class _Rows(threading.local):
    """The stack and each row's adapter index for the forward pass in progress in this thread (set by
    MultiLoraModel.forward), so that threads may run forward passes side by side; and a stack pinned for the thread
    (MultiLoraModel.pinned), so that the passes of one request use one set of adapters."""

    stack: Stack | None = None
    index: torch.Tensor | None = None
    pinned: Stack | None = None


def _row_bias(out: torch.Tensor, bias: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out`` (rows, ..., features) plus each row's own bias vector (the bias add the module itself skipped)."""
    b = bias[idx].to(out.dtype)
    return out + b.view(b.shape[0], *([1] * (out.dim() - 2)), b.shape[-1])


class StackedLinear(nn.Module):
    """A shared Linear, plus each row's LoRA (where its adapter has one here) and its own trained bias (where some
    adapter of the stack trained this module's bias). A module the stack knows nothing of is the base alone."""

    def __init__(self, base: nn.Linear, key: str, rows: _Rows):
        super().__init__()
        self.base, self.key, self.rows = base, key, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stack, idx = self.rows.stack, self.rows.index
        bias = stack.biases.get(self.key) if stack is not None else None
        lora = stack.lora.get(self.key) if stack is not None else None
        out = self.base(x) if bias is None else _row_bias(F.linear(x, self.base.weight), bias, idx)
        if lora is None:
            return out
        a, b = lora
        low = torch.bmm(x.to(a.dtype), a[idx].transpose(1, 2))
        return out + torch.bmm(low, b[idx].transpose(1, 2)).to(out.dtype)


class StackedEmbedding(nn.Module):
    """A shared Embedding plus each row's LoRA: PEFT's ``embedding(ids, A.T) @ B.T * scaling``, gathered per row."""

    def __init__(self, base: nn.Embedding, key: str, rows: _Rows):
        super().__init__()
        self.base, self.key, self.rows = base, key, rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        stack = self.rows.stack
        lora = stack.embed.get(self.key) if stack is not None else None
        if lora is None:
            return out
        a, b = lora
        idx = self.rows.index
        low = a[idx.view(-1, *([1] * (ids.dim() - 1))), ids]  # (rows, ..., r): each token's row of its adapter's A
        low = low.reshape(ids.shape[0], -1, a.shape[-1])
        return out + torch.bmm(low, b[idx].transpose(1, 2)).view_as(out).to(out.dtype)


class StackedTable(nn.Module):
    """A shared Embedding that some adapters trained whole (``--case``: the token-type table): each row looks its ids
    up in its own adapter's table."""

    def __init__(self, base: nn.Embedding, key: str, rows: _Rows):
        super().__init__()
        self.base, self.key, self.rows = base, key, rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        stack = self.rows.stack
        table = stack.tables.get(self.key) if stack is not None else None
        if table is None:
            return self.base(ids)
        return table[self.rows.index.view(-1, *([1] * (ids.dim() - 1))), ids]


class StackedLayerNorm(nn.Module):
    """A shared LayerNorm whose bias (beta) some adapters trained."""

    def __init__(self, base: nn.LayerNorm, key: str, rows: _Rows):
        super().__init__()
        self.base, self.key, self.rows = base, key, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stack, b = self.rows.stack, self.base
        bias = stack.biases.get(self.key) if stack is not None else None
        if bias is None:
            return b(x)
        return _row_bias(F.layer_norm(x, b.normalized_shape, b.weight, None, b.eps), bias, self.rows.index)


class StackedHead(nn.Module):
    """One Linear classifier head per adapter, of any size: heads with fewer labels are zero-padded to the largest,
    and each row's caller reads only its own adapter's labels (Tagger.decode_logits takes the first len(labels))."""

    def __init__(self, base: nn.Linear, key: str, rows: _Rows):
        super().__init__()
        self.base, self.key, self.rows = base, key, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stack, idx = self.rows.stack, self.rows.index
        if stack is None or stack.head is None:
            return self.base(x)
        _, weight, bias = stack.head
        return torch.baddbmm(bias[idx].unsqueeze(1), x.to(weight.dtype), weight[idx].transpose(1, 2))


WRAPPERS = {"lora": StackedLinear, "embed": StackedEmbedding, "table": StackedTable, "norm": StackedLayerNorm,
            "head": StackedHead}  # fmt: skip


def _plain(module: nn.Module) -> nn.Module:
    """The base module under PEFT's wrappers (a LoRA layer's base layer, a head's original module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, tuple(WRAPPERS.values())):
        return module.base
    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def _kind(stack: Stack, key: str, module: nn.Module) -> str:
    """Which wrapper a module of the stack takes; Unstackable where none fits."""
    if stack.head is not None and key == stack.head[0]:
        if type(module) is not nn.Linear:
            raise Unstackable("a classifier head that is not one Linear layer")
        return "head"
    if key in stack.tables:
        if type(module) is not nn.Embedding or key in stack.embed:
            raise Unstackable(f"{key} trained whole, a {type(module).__name__} (or with LoRA on it too)")
        return "table"
    if key in stack.embed:
        return "embed"
    if type(module) is nn.Linear:
        return "lora"
    if type(module) is nn.LayerNorm and module.elementwise_affine and key not in stack.lora:
        return "norm"
    raise Unstackable(f"a trained bias or LoRA on {key}, a {type(module).__name__}")


class MultiLoraModel(nn.Module):
    """A transformers token classifier whose modules take each row's adapter from ``adapter_names`` (the keyword
    PEFT uses for the same thing), over the adapters of the installed ``Stack``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.rows = model, _Rows()
        self.stack: Stack | None = None
        self._installing = threading.Lock()

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def install(self, stack: Stack) -> None:
        """Serve ``stack`` from the next forward pass on; passes in progress finish with the stack they began with.
        Modules the stack needs are wrapped first (a wrapper the running passes' stacks know nothing of acts as
        its base alone); raises Unstackable, the model untouched, where a module cannot be wrapped."""
        with self._installing:
            swaps = []
            for key in sorted(stack.modules()):
                current = self.model.get_submodule(key)
                kind = _kind(stack, key, _plain(current))
                if not isinstance(current, WRAPPERS[kind]):
                    swaps.append((key, WRAPPERS[kind](_plain(current), key, self.rows)))
            for key, new in swaps:
                parent, _, child = key.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, new)
            self.stack = stack

    @contextlib.contextmanager
    def pinned(self, stack: Stack):
        """Forward passes of this thread use ``stack`` (one request's passes all see the same adapters)."""
        before, self.rows.pinned = self.rows.pinned, stack
        try:
            yield
        finally:
            self.rows.pinned = before

    def forward(self, input_ids, attention_mask=None, adapter_names=None, **kw):
        if adapter_names is None or len(adapter_names) != len(input_ids):
            raise ValueError("MultiLoraModel needs adapter_names: one adapter name per row")
        stack = self.rows.pinned or self.stack
        index = stack.index if stack is not None else {}
        self.rows.stack = stack
        self.rows.index = torch.tensor([index[n] for n in adapter_names], device=input_ids.device)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        finally:
            self.rows.stack = self.rows.index = None


def weights_of(peft_model, name: str, biases=None, head=None, shown: str | None = None) -> AdapterWeights:
    """Adapter ``name``'s tensors out of a PEFT model (LoRA with its scaling folded into B). ``biases``: its trained
    biases by module name; ``head``: its classifier's (weight, bias) [default: PEFT's own copy]; ``shown``: the
    name errors give it [default: ``name``]."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    lora, embed, tables, head_of = {}, {}, {}, None
    for key, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            if name not in module.lora_A and name not in module.lora_embedding_A:
                continue  # no LoRA of this adapter here: the base alone
            if module.use_dora.get(name, False):
                raise Unstackable(f"adapter {shown or name!r} uses DoRA")
            if module.lora_bias.get(name, False) or name in getattr(module, "lora_variant", {}):
                raise Unstackable(f"adapter {shown or name!r} uses a LoRA variant or LoRA's own bias")
            base, scale = module.get_base_layer(), module.scaling[name]
            if type(base) is nn.Linear:
                lora[key] = (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach() * scale)
            elif type(base) is nn.Embedding:
                embed[key] = (module.lora_embedding_A[name].detach(), module.lora_embedding_B[name].detach() * scale)
            else:
                raise Unstackable(f"LoRA on a {type(base).__name__}, not a Linear or Embedding layer")
        elif isinstance(module, ModulesToSaveWrapper):
            own = module.modules_to_save[name] if name in module.modules_to_save else module.original_module
            if type(own) is nn.Embedding:  # --case: the token-type table, trained whole
                tables[key] = own.weight.detach()
                continue
            if not isinstance(own, nn.Linear):
                raise Unstackable("a classifier head that is not one Linear layer")
            if head is None:
                zero = own.weight.new_zeros(own.out_features)
                head = (own.weight.detach(), own.bias.detach() if own.bias is not None else zero)
            head_of = key
        elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):  # other PEFT kinds
            raise Unstackable(f"{key} is a {type(module).__name__}, not plain LoRA")
    own_head = (head_of, *head) if head_of is not None and head is not None else None
    return AdapterWeights(lora, embed, dict(biases or {}), own_head, tables)


def _stack_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor] | None], a_shape, b_shape, like: torch.Tensor):
    """Per adapter (A (r, ...), B (..., r)) or None -> zero-padded ``(adapters, r, ...)``, ``(adapters, ..., r)``."""
    rank = max(p[0].shape[0] for p in pairs if p is not None)
    a = like.new_zeros(len(pairs), rank, *a_shape)
    b = like.new_zeros(len(pairs), *b_shape, rank)
    for i, p in enumerate(pairs):
        if p is not None:  # an adapter without LoRA here keeps zeros: the base alone
            r = p[0].shape[0]
            if p[0].shape[1:] != tuple(a_shape) or p[1].shape[:-1] != tuple(b_shape):
                shapes = f"{tuple(p[0].shape)} x {tuple(p[1].shape)}"
                raise Unstackable(f"LoRA of shape {shapes} on a layer of another size")
            a[i, :r], b[i, ..., :r] = p[0], p[1]
    return a, b


@torch.no_grad()
def stack(names: list[str], weights: list[AdapterWeights], model: nn.Module) -> Stack:
    """The adapters' tensors stacked in ``names`` order, on the device and dtype of ``model``'s modules."""
    lora, embed, biases = {}, {}, {}
    for key in sorted({k for w in weights for k in w.lora}):
        base = _plain(model.get_submodule(key))
        if type(base) is not nn.Linear:
            raise Unstackable(f"LoRA on {key}, a {type(base).__name__}, not a Linear layer")
        pairs = [w.lora.get(key) for w in weights]
        lora[key] = _stack_pairs(pairs, [base.in_features], [base.out_features], base.weight)
    for key in sorted({k for w in weights for k in w.embed}):
        base = _plain(model.get_submodule(key))
        if type(base) is not nn.Embedding:
            raise Unstackable(f"embedding LoRA on {key}, a {type(base).__name__}")
        pairs = [w.embed.get(key) for w in weights]
        a, b = _stack_pairs(pairs, [base.num_embeddings], [base.embedding_dim], base.weight)
        embed[key] = (a.transpose(1, 2).contiguous(), b)  # (adapters, vocab, r): a token's row gathered at once
    for key in sorted({k for w in weights for k in w.biases}):
        base = _plain(model.get_submodule(key))
        own = base.bias if getattr(base, "bias", None) is not None else base.weight.new_zeros(base.weight.shape[0])
        rows = []
        for w in weights:
            v = w.biases.get(key, own)
            if v.shape != own.shape:
                raise Unstackable(f"a bias of shape {tuple(v.shape)} for {key}, whose bias is {tuple(own.shape)}")
            rows.append(v.to(own.device, own.dtype))
        biases[key] = torch.stack(rows)
    tables = {}
    for key in sorted({k for w in weights for k in w.tables}):
        base = _plain(model.get_submodule(key))
        if type(base) is not nn.Embedding:
            raise Unstackable(f"a table trained whole for {key}, a {type(base).__name__}")
        rows = [w.tables.get(key, base.weight) for w in weights]  # an adapter that did not train it: the base's
        if any(t.shape != base.weight.shape for t in rows):
            raise Unstackable(f"a table trained whole for {key} of another shape than its {tuple(base.weight.shape)}")
        tables[key] = torch.stack([t.to(base.weight.device, base.weight.dtype) for t in rows])
    heads = [w.head for w in weights if w.head is not None]
    head = None
    if heads:
        if len(heads) != len(weights) or len({h[0] for h in heads}) > 1:
            raise Unstackable("adapters whose classifier heads are not all the same module")
        key = heads[0][0]
        like = _plain(model.get_submodule(key)).weight
        size = max(h[1].shape[0] for h in heads)
        weight = like.new_zeros(len(heads), size, like.shape[1])
        bias = like.new_zeros(len(heads), size)
        for i, (_, w, b) in enumerate(heads):
            if w.shape[1] != like.shape[1]:
                raise Unstackable(f"a classifier head for hidden size {w.shape[1]}, the base's is {like.shape[1]}")
            weight[i, : w.shape[0]], bias[i, : b.shape[0]] = w, b
        head = (key, weight, bias)
    return Stack(tuple(names), lora, embed, biases, head, tables)


@torch.no_grad()
def build(
    peft_model,
    names: list[str],
    biases: list[dict[str, torch.Tensor]] | None = None,
    heads: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> MultiLoraModel:
    """A PEFT model holding adapters ``names`` -> a MultiLoraModel over them (in that order), the PEFT model's
    modules replaced in place. ``biases``: per adapter, trained biases by module name, applied per row.
    ``heads``: per adapter, its classifier's (weight, bias), of any label count [default: PEFT's own copies].
    Raises Unstackable, the PEFT model untouched, when something is beyond this module."""
    biases = biases or [{} for _ in names]
    heads = heads or [None for _ in names]
    weights = [weights_of(peft_model, n, b, h) for n, b, h in zip(names, biases, heads)]
    model = MultiLoraModel(peft_model.base_model.model)
    model.install(stack(names, weights, model.model))
    return model.eval()
