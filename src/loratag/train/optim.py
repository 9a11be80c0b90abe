"""AdamW as transformers' Trainer sets it up (the guide's optimizer), with a linear schedule whose end the loop
may move (a --time-budget run plans again as it goes)."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig
from ..crf import MODULE as CRF_MODULE
from ..modeling import CASE_MODULE


def param_groups(
    model, weight_decay: float, lr: float, lora_plus_ratio: float = 1.0, crf_lr: float | None = None
) -> list[dict]:
    """As transformers' Trainer (which the guide uses): no weight decay on biases and LayerNorm weights; nor on the
    token-type table of --case, whose row 0 must stay the base's (``modeling.train_case_row``). LoRA+ (Hayou et al.
    2024): the B matrices learn ``lora_plus_ratio`` times faster than the A matrices. The CRF's scores (--crf) learn
    at their own rate, without decay: they start at 0 and a few numbers must move far (a known need of BERT-CRF)."""
    groups: dict[tuple[bool, bool], list] = {}
    crf = []
    for name, p in model.named_parameters():
        if p.requires_grad and CRF_MODULE in name:
            crf.append(p)
        elif p.requires_grad:
            decay = not (name.endswith("bias") or p.ndim == 1 or CASE_MODULE in name)
            groups.setdefault((decay, "lora_B" in name and lora_plus_ratio != 1.0), []).append(p)
    out = [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * (lora_plus_ratio if b else 1.0)}
        for (decay, b), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]
    return out + ([{"params": crf, "weight_decay": 0.0, "lr": crf_lr or lr}] if crf else [])


class Optimizer:
    """AdamW, the learning-rate schedule of transformers' ``get_linear_schedule_with_warmup`` (linear warmup, then
    linear decay to 0 at the last step), and the gradient scaler for fp16 on CUDA (a no-op otherwise). The schedule
    is written out because its last step can move: ``ends_at`` sets it."""

    def __init__(self, model, t: TrainConfig, planned_steps: int, device: torch.device, dtype):
        # fused: one kernel for all parameters, where the loop version runs ~10 small ops per tensor (a LoRA model
        # has hundreds of tensors); transformers' Trainer defaults to it too (adamw_torch_fused)
        groups = param_groups(model, t.weight_decay, t.lr, t.lora_plus_ratio, t.crf_lr)
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, fused=device.type in ("cpu", "cuda"))
        self.warmup = math.ceil(t.warmup_ratio * planned_steps)  # from the first plan, kept when the end moves
        self.total = planned_steps
        # a plain function: LambdaLR's state then holds no copy of it
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self._factor(step))
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")

    def _factor(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))

    def ends_at(self, total_steps: int) -> None:
        """The schedule's last step (the learning rate reaches 0 there)."""
        self.total = total_steps

    def step(self, loss: torch.Tensor, model) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's default, as in the guide
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).state_dict() for k in ("optimizer", "scheduler", "scaler")}

    def load_state_dict(self, d: dict) -> None:
        for k in ("optimizer", "scheduler", "scaler"):
            getattr(self, k).load_state_dict(d[k])
