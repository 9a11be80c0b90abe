"""Many LoRA adapters in one batch, one adapter per row, by gathered batched matmuls.

PEFT runs a mixed-adapter batch (``adapter_names``) as a Python loop over the adapters present in every LoRA
layer and classifier head: index the rows of one adapter, run its A and B, scatter the result back: a few small ops
per adapter per layer, so a mixed batch runs well below a one-adapter batch on a CPU (docs/serving.md has the
measurements). Here every adapter's A and B are stacked once at load (``A: (adapters, r, in)``,
``B: (adapters, out, r)``, scaling folded into B, ranks zero-padded to the largest), and a layer gathers each
row's matrices and runs two ``bmm``: the same few ops for any number of adapters (the "BGMV" idea of
multi-LoRA LLM servers, which no library offers for encoder classifiers). The base weights stay shared and
unmerged, so the answer of a row depends only on its own adapter, as in PEFT.

Adapters trained with bias "all" or "lora_only" change the base model's own biases (Linear and LayerNorm). PEFT
writes them into the shared base (so it allows one such adapter); here each module whose bias some adapter trained
holds a stacked ``(adapters, features)`` bias and adds each row's own, the base's weights and biases untouched.

Written by hand for that reason; ``build`` raises Unstackable for anything beyond plain LoRA on Linear layers,
Linear classifier heads and biases of Linear / LayerNorm modules (DoRA, LoRA's own lora_bias, variants,
embeddings, convolutions), and callers then keep PEFT's own mixed-batch path.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.nn import functional as F


class Unstackable(ValueError):
    """The adapters hold something the stacked path does not cover; the message says what."""


class _Rows(threading.local):
    """Each row's adapter index for the forward pass in progress in this thread (set by
    MultiLoraModel.forward), so that threads may run forward passes side by side."""

    index: torch.Tensor | None = None


def _row_bias(out: torch.Tensor, bias: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out`` (rows, ..., features) plus each row's own bias vector (the bias add the module itself skipped)."""
    b = bias[idx].to(out.dtype)
    return out + b.view(b.shape[0], *([1] * (out.dim() - 2)), b.shape[-1])


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, rows: _Rows, bias: torch.Tensor | None):
        super().__init__()
        self.base, self.rows = base, rows
        self.register_buffer("a", a)  # (adapters, r, in)
        self.register_buffer("b", b)  # (adapters, out, r), scaling folded in
        self.register_buffer("row_bias", bias)  # (adapters, out) or None: the base's own bias serves every row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.rows.index
        low = torch.bmm(x.to(self.a.dtype), self.a[idx].transpose(1, 2))
        if self.row_bias is None:
            out = self.base(x)
        else:
            out = _row_bias(F.linear(x, self.base.weight), self.row_bias, idx)
        return out + torch.bmm(low, self.b[idx].transpose(1, 2)).to(out.dtype)


class RowBiasLinear(nn.Module):
    """A shared Linear whose bias some adapters trained: the shared weight, each row's own bias."""

    def __init__(self, base: nn.Linear, bias: torch.Tensor, rows: _Rows):
        super().__init__()
        self.base, self.rows = base, rows
        self.register_buffer("row_bias", bias)  # (adapters, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _row_bias(F.linear(x, self.base.weight), self.row_bias, self.rows.index)


class RowBiasLayerNorm(nn.Module):
    """A shared LayerNorm whose bias (beta) some adapters trained."""

    def __init__(self, base: nn.LayerNorm, bias: torch.Tensor, rows: _Rows):
        super().__init__()
        self.base, self.rows = base, rows
        self.register_buffer("row_bias", bias)  # (adapters, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        return _row_bias(F.layer_norm(x, b.normalized_shape, b.weight, None, b.eps), self.row_bias, self.rows.index)


class MultiHead(nn.Module):
    """One Linear classifier head per adapter, of any size: heads with fewer labels are zero-padded to the largest,
    and each row's caller reads only its own adapter's labels (Tagger.decode_logits takes the first len(labels))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rows: _Rows):
        super().__init__()
        self.rows = rows
        self.register_buffer("weight", weight)  # (adapters, labels, hidden)
        self.register_buffer("bias", bias)  # (adapters, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.rows.index
        return torch.baddbmm(self.bias[idx].unsqueeze(1), x.to(self.weight.dtype), self.weight[idx].transpose(1, 2))


class MultiLoraModel(nn.Module):
    """A transformers token classifier whose LoRA layers and head take each row's adapter from
    ``adapter_names`` (the keyword PEFT uses for the same thing). The row index is thread-local state of
    the layers, set here for the call in progress."""

    def __init__(self, model: nn.Module, names: list[str], rows: _Rows):
        super().__init__()
        self.model, self.rows = model, rows
        self.index = {n: i for i, n in enumerate(names)}

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask=None, adapter_names=None, **kw):
        if adapter_names is None or len(adapter_names) != len(input_ids):
            raise ValueError("MultiLoraModel needs adapter_names: one adapter name per row")
        self.rows.index = torch.tensor([self.index[n] for n in adapter_names], device=input_ids.device)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        finally:
            self.rows.index = None


def _stack_lora(layer, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise Unstackable(f"LoRA on a {type(base).__name__}, not a Linear layer")
    for n in names:
        if n in layer.lora_A:
            if layer.use_dora.get(n, False):
                raise Unstackable(f"adapter {n!r} uses DoRA")
            if layer.lora_bias.get(n, False) or n in getattr(layer, "lora_variant", {}):
                raise Unstackable(f"adapter {n!r} uses a LoRA variant or LoRA's own bias")
    rank = max((layer.lora_A[n].weight.shape[0] for n in names if n in layer.lora_A), default=1)
    a = torch.zeros(len(names), rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
    b = torch.zeros(len(names), base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device)
    for i, n in enumerate(names):
        if n in layer.lora_A:  # an adapter without LoRA on this layer keeps zeros: the base alone
            r = layer.lora_A[n].weight.shape[0]
            a[i, :r] = layer.lora_A[n].weight
            b[i, :, :r] = layer.lora_B[n].weight * layer.scaling[n]
    return a, b


def _stack_head(wrapper, heads: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(adapters, labels, hidden)`` and ``(adapters, labels)``: each adapter's head, zero-padded to the widest."""
    if not isinstance(wrapper.original_module, nn.Linear):
        raise Unstackable("a classifier head that is not one Linear layer")
    size = max(w.shape[0] for w, _ in heads)
    like = wrapper.original_module.weight
    weight = like.new_zeros(len(heads), size, like.shape[1])
    bias = like.new_zeros(len(heads), size)
    for i, (w, b) in enumerate(heads):
        if w.shape[1] != like.shape[1]:
            raise Unstackable(f"a classifier head for hidden size {w.shape[1]}, the base's is {like.shape[1]}")
        weight[i, : w.shape[0]], bias[i, : b.shape[0]] = w, b
    return weight, bias


def _peft_head(wrapper, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    h = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
    if not isinstance(h, nn.Linear):
        raise Unstackable("a classifier head that is not one Linear layer")
    return h.weight, h.bias if h.bias is not None else h.weight.new_zeros(h.out_features)


def _stack_bias(module: nn.Module, name: str, biases: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """``(adapters, features)``: each adapter's trained bias of ``module``, the base's own where it trained none."""
    own = module.bias if module.bias is not None else module.weight.new_zeros(module.weight.shape[0])
    rows = []
    for b in biases:
        v = b.get(name, own)
        if v.shape != own.shape:
            raise Unstackable(f"a bias of shape {tuple(v.shape)} for {name}, whose bias is {tuple(own.shape)}")
        rows.append(v.to(own.dtype))
    return torch.stack(rows)


@torch.no_grad()
def build(
    peft_model,
    names: list[str],
    biases: list[dict[str, torch.Tensor]] | None = None,
    heads: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> MultiLoraModel:
    """The PEFT model's LoRA layers and heads replaced in place by stacked ones over ``names`` (in that order).
    ``biases``: per adapter (same order), trained biases by module name (bias "all" / "lora_only" adapters),
    applied per row. ``heads``: per adapter, its classifier's (weight, bias), of any label count [default: PEFT's
    own copies]. Raises Unstackable, the PEFT model untouched, when something is beyond this module."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    biases = biases or [{} for _ in names]
    model = peft_model.base_model.model
    rows = _Rows()
    biased = {m for b in biases for m in b}
    swaps, done = [], set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            a, b = _stack_lora(module, names)
            base = module.get_base_layer()
            bias = _stack_bias(base, name, biases) if name in biased else None
            swaps.append((name, MultiLoraLinear(base, a, b, rows, bias)))
            done.add(name)
        elif isinstance(module, ModulesToSaveWrapper):
            own = heads or [_peft_head(module, n) for n in names]
            swaps.append((name, MultiHead(*_stack_head(module, own), rows)))
        elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):  # other PEFT kinds
            raise Unstackable(f"{name} is a {type(module).__name__}, not plain LoRA")
        elif name in biased:
            if type(module) is nn.Linear:
                swaps.append((name, RowBiasLinear(module, _stack_bias(module, name, biases), rows)))
            elif type(module) is nn.LayerNorm and module.elementwise_affine:
                swaps.append((name, RowBiasLayerNorm(module, _stack_bias(module, name, biases), rows)))
            else:
                raise Unstackable(f"a trained bias on {name}, a {type(module).__name__}")
            done.add(name)
    left = biased - done
    if left:
        raise Unstackable(f"trained biases for modules that are not there, e.g. {sorted(left)[0]}")
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return MultiLoraModel(model, names, rows).eval()
