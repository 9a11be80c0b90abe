"""Where one training step's time goes: loratag's defaults (LoRA r 16 on every Linear, biases trained) against
full fine-tuning of the same base (fused AdamW, as Trainer), at the same batch and precision; against
loratag's former per-tensor AdamW loop ("lora-loop"); and against frozen weights kept in fp32 and cast by autocast
at every step ("lora-cast"; training stores them in bf16 once, `--low-precision-weights`). Prints one JSON line.

    python benchmarks/bench_step.py                       # MiniLM, batch 16 x 40 tokens (BioNLP2004's mean)
    python benchmarks/bench_step.py --batch 16 --length 64 --steps 30

A step is forward + backward + AdamW step on a fixed random batch (no data loading, no padding), timed after
warm-up steps, arms interleaved round by round so that drift on a shared machine hits both alike. The
profiler's table splits each step by operator kind: the dense matmuls of the frozen / full weights, LoRA's
small rank-r matmuls (recognised by their rank-sized dimension), and the rest (attention, norms, GELU, the
optimizer, autograd bookkeeping). The FLOP count of the base matmuls gives the achieved fraction of the
machine's matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_facts, emit, matmul_peak  # noqa: E402

LABELS = ("O", "B-DNA", "I-DNA", "B-protein", "I-protein", "B-cell_type", "I-cell_type", "B-cell_line",
          "I-cell_line", "B-RNA", "I-RNA")  # fmt: skip


def build(arm: str, model: str):
    import torch

    from loratag.config import Config
    from loratag.labels import LabelSet
    from loratag.modeling import build_model, load_base, resolve_model

    torch.manual_seed(0)
    labels = LabelSet(LABELS)
    cfg = Config(model=model)
    lora = arm.startswith("lora")
    net = build_model(cfg, labels) if lora else load_base(resolve_model(model), labels)
    params = [p for p in net.parameters() if p.requires_grad]
    lr = cfg.train.lr if lora else 1e-4
    # "lora-loop": AdamW's per-tensor loop, as loratag ran before it went fused (Trainer's default is fused)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay, fused=arm != "lora-loop")
    return net, opt, sum(p.numel() for p in params)


def step(net, opt, batch, dtype) -> None:
    import torch

    from loratag.precision import autocast

    with autocast(torch.device("cpu"), dtype):
        loss = net(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def kind_of(event, rank: int) -> str:
    """The operator kind of a profiler event: base matmul, LoRA matmul (one input dimension is the rank), other."""
    name = event.key
    if name not in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "other"
    shapes = [s for s in (event.input_shapes or []) if s]
    dims = {d for s in shapes for d in s[-2:]}
    return "lora_matmul" if rank in dims else "base_matmul"


def profile(net, opt, batch, dtype, rank: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step(net, opt, batch, dtype)
    # self time of the leaf kernels: mm/addmm/bmm carry their own time; linear/matmul are wrappers (self ~0)
    split = {"base_matmul": 0.0, "lora_matmul": 0.0, "other": 0.0}
    calls = {"base_matmul": 0, "lora_matmul": 0}
    for ev in prof.key_averages(group_by_input_shape=True):
        k = kind_of(ev, rank)
        split[k] += ev.self_cpu_time_total / 1e6 / steps
        if k != "other" and ev.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            calls[k] += ev.count // steps
    total = sum(split.values())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "profiled_s_per_step": round(total, 4),
        "share": {k: round(v / total, 3) for k, v in split.items()},
        "profiled_split_s": {k: round(v, 4) for k, v in split.items()},
        "matmul_calls_per_step": calls,
        "top_ops": [[e.key, round(e.self_cpu_time_total / 1e6 / steps, 4), e.count // steps] for e in top],
    }


def base_matmul_flops(net_config, tokens: int) -> float:
    """FLOPs of the encoder's Linear layers and the head for one step (forward + 2x backward)."""
    h, inter, n = net_config.hidden_size, net_config.intermediate_size, net_config.num_hidden_layers
    per_token_fwd = n * 2 * (4 * h * h + 2 * h * inter)
    return 3 * per_token_fwd * tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=40, help="tokens per sentence (BioNLP2004 on MiniLM: ~39)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    args = ap.parse_args()

    import torch

    from loratag.precision import resolve_precision
    from loratag.train.frozen import low_precision_weights

    dtype = resolve_precision(args.precision, torch.device("cpu"))
    peak = matmul_peak()
    arms = {a: build(a, args.model) for a in ("lora", "lora-loop", "lora-cast", "full")}
    with contextlib.ExitStack() as keep:
        for a in ("lora", "lora-loop"):  # as training does: frozen weights in the autocast dtype once
            keep.enter_context(low_precision_weights(arms[a][0], dtype))
        measure(arms, dtype, args, peak)


def batch_of(cfg, args) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (args.batch, args.length), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, len(LABELS), ids.shape, generator=g),
    }


def measure(arms, dtype, args, peak) -> None:
    from loratag.precision import precision_name

    cfg = arms["lora"][0].get_base_model().config
    batch = batch_of(cfg, args)
    for net, opt, _ in arms.values():
        net.train()
        for _ in range(3):
            step(net, opt, batch, dtype)
    times: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(args.rounds):
        for a, (net, opt, _) in arms.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(net, opt, batch, dtype)
            times[a].append((time.perf_counter() - t) / args.steps)
    flops = base_matmul_flops(cfg, args.batch * args.length)
    result = {
        "model": args.model,
        "batch": [args.batch, args.length],
        "autocast": precision_name(dtype),
        "cpu": cpu_facts(),
        "matmul_peak_gflops": peak,
    }
    for a, (net, opt, trainable) in arms.items():
        s = statistics.median(times[a])
        # full FT computes weight gradients too: 3 matmuls per Linear; LoRA's frozen base needs 2 (no weight grad)
        useful = flops if a == "full" else flops * 2 / 3
        result[a] = {
            "trainable_params": trainable,
            "s_per_step": round(s, 4),
            "tokens_per_s": round(args.batch * args.length / s, 1),
            "base_matmul_gflop_per_step": round(useful / 1e9, 2),
            "fraction_of_peak": round(useful / s / 1e9 / peak[precision_name(dtype)], 3),
            **profile(net, opt, batch, dtype, net.peft_config["default"].r if a != "full" else -1, 5),
        }
    result["full_over_lora_time"] = round(result["full"]["s_per_step"] / result["lora"]["s_per_step"], 3)
    result["loop_over_fused_time"] = round(result["lora-loop"]["s_per_step"] / result["lora"]["s_per_step"], 3)
    result["cast_over_stored_time"] = round(result["lora-cast"]["s_per_step"] / result["lora"]["s_per_step"], 3)
    emit(result)


if __name__ == "__main__":
    main()
