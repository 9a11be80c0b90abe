"""Less work per step: LoRA on the top layers with the frozen layers below cached, frozen weights stored once in
bf16, LoRA+ and rsLoRA, the loss divisor, and the optimizer (the --time-budget planner: test_budget.py)."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from loratag.encoding import collate, encode
from loratag.labels import LabelSet
from loratag.modeling import build_model, load_tokenizer
from loratag.tagger import Tagger
from loratag.train import train_and_load
from loratag.train.frozen import LayerCache, layers_only, low_precision_weights
from loratag.train.optim import Optimizer, param_groups
from loratag.train.session import loss_divisors

from .conftest import RESOURCES
from .test_train import WORDS, plain_peft_logits

LABELS = LabelSet.load(RESOURCES / "tiny/label.json")
SENTENCES = [["IL-2", "gene", "expression", "requires", "NF-kappa", "B", "."], ["T", "cells", "."], ["CD28"]]


def _top(cfg, k=1, bias="all", base=None):
    return replace(cfg, model=str(base or cfg.model), lora=replace(cfg.lora, top_layers=k, bias=bias))


def test_top_layers_adapt_and_train_only_the_top_layers(tiny_cfg):
    model = build_model(_top(tiny_cfg), LABELS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layer.1." in n or "classifier" in n for n in trainable)
    assert any(n.endswith("bias") and ".layer.1." in n for n in trainable)  # bias all: the top layer's biases
    assert not any("embeddings" in n or ".layer.0." in n for n in trainable)
    acfg = model.peft_config["default"]
    assert list(acfg.layers_to_transform) == [1]


def test_more_top_layers_than_the_encoder_has_is_an_error(tiny_cfg):
    with pytest.raises(ValueError, match="only 2 layers"):
        build_model(_top(tiny_cfg, k=3), LABELS)
    with pytest.raises(ValueError, match="a count >= 1 or a fraction"):
        _top(tiny_cfg, k=1.5)


@pytest.mark.parametrize("spec, n, adapted", [(0.5, 6, 3), (0.5, 24, 12), (0.6, 6, 4), (0.01, 6, 1), (4, 6, 4)])
def test_a_fraction_of_the_layers_is_the_same_share_of_any_depth(tiny_cfg, spec, n, adapted):
    assert _top(tiny_cfg, k=spec).lora.adapted_layers(n) == adapted


def test_the_top_half_of_a_two_layer_encoder_is_its_top_layer(tiny_cfg):
    model = build_model(_top(tiny_cfg, k=0.5), LABELS)
    assert list(model.peft_config["default"].layers_to_transform) == [1]


def test_cached_lower_layers_give_the_same_logits_and_gradients(tiny_cfg, tiny_bert_nodrop):
    """Without dropout, the top layer run on the cached output of the layer below equals the whole model (fp32)."""
    cfg = _top(tiny_cfg, base=tiny_bert_nodrop)
    cfg = replace(cfg, lora=replace(cfg.lora, dropout=0.0))
    torch.manual_seed(0)
    model = build_model(cfg, LABELS)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    tok = load_tokenizer(cfg.model)
    windows, _ = encode(tok, SENTENCES, 64)
    cache = LayerCache.build(model, windows, 1, tok.pad_token_id, None, torch.device("cpu"), batch_size=2)
    assert cache.flat.shape[0] == sum(len(w.input_ids) for w in windows)
    model.train()
    rows = [0, 1, 2]
    batch = collate([windows[i] for i in rows], tok.pad_token_id)
    mask = batch["attention_mask"].bool()  # padded positions differ (pad embeddings vs zeros) and are never scored
    whole = model(**batch).logits
    whole[mask].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with layers_only(model, 1, None, cached_input=True):
        states = cache.states(rows, batch["input_ids"].shape[1])
        top = model(inputs_embeds=states, attention_mask=batch["attention_mask"]).logits
        top[mask].sum().backward()
    torch.testing.assert_close(top[mask], whole[mask], rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
    assert len(model.base_model.model.bert.encoder.layer) == 2  # the full model is back after the block


def test_a_top_layers_run_reloads_as_a_plain_peft_adapter(tiny_cfg, tiny_bert, tmp_path):
    cfg = replace(_top(tiny_cfg), train=replace(tiny_cfg.train, epochs=1, lr=0.05))
    run, mem = train_and_load(cfg, tmp_path / "run", progress=False)
    facts = json.loads((run / "config.json").read_text())["run"]
    assert facts["cached_layers"] == 1 and facts["cache_bytes"] > 0
    expected = mem.word_logits(WORDS)
    for e, a, p in zip(
        expected, Tagger.load(run).word_logits(WORDS), plain_peft_logits(tiny_bert, run / "adapter", mem, WORDS)
    ):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]["by_decode"]) == {"argmax", "constrained"}
    assert set(metrics["epochs"][0]["validation"]["by_decode"]) == {"argmax", "constrained"}


def test_frozen_weights_stored_once_in_bf16_give_the_same_bf16_logits(tiny_cfg):
    model = build_model(replace(tiny_cfg, lora=replace(tiny_cfg.lora, bias="all")), LABELS).eval()
    batch = collate(encode(load_tokenizer(tiny_cfg.model), SENTENCES, 64)[0], 0)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = {id(m): m.weight.detach().clone() for m in linear}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(**batch).logits
        with low_precision_weights(model, torch.bfloat16) as cast:
            assert cast == sum(not m.weight.requires_grad for m in linear) > 0
            assert all(m.weight.dtype == (torch.float32 if m.weight.requires_grad else torch.bfloat16) for m in linear)
            stored = model(**batch).logits
    torch.testing.assert_close(stored, reference, rtol=0, atol=0)  # autocast rounds a weight exactly so
    assert all(torch.equal(m.weight, before[id(m)]) and m.weight.dtype == torch.float32 for m in linear)
    with low_precision_weights(model, None) as cast:  # fp32: nothing to do
        assert cast == 0


def test_lora_plus_gives_the_b_matrices_a_larger_learning_rate(tiny_cfg):
    model = build_model(tiny_cfg, LABELS)
    groups = param_groups(model, 0.01, 1e-3, lora_plus_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        is_b = {"lora_B" in names[id(p)] for p in g["params"]}
        assert len(is_b) == 1
        assert g["lr"] == (16e-3 if is_b.pop() else 1e-3)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert all(g["lr"] == 1e-3 for g in param_groups(model, 0.01, 1e-3))


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_cfg):
    model = build_model(replace(tiny_cfg, lora=replace(tiny_cfg.lora, r=4, alpha=8, rslora=True)), LABELS)
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["default"] == pytest.approx(8 / 2)  # alpha / sqrt(r), not alpha / r = 2


def test_length_grouped_batches_weight_every_token_equally():
    """A per-batch mean over length-grouped batches weights a token of a short-sentence batch more; a constant
    per-epoch divisor weights every token alike (and random batches keep the Trainer's per-batch mean)."""

    class W:
        def __init__(self, n):
            self.first, self.last = 0, n

    windows = [W(2), W(2), W(10), W(10)]
    plan = [[0, 1], [2, 3]]
    assert loss_divisors(plan, windows, per_epoch=False) == [4.0, 20.0]
    assert loss_divisors(plan, windows, per_epoch=True) == [12.0, 12.0]  # 24 tokens / 2 batches


def test_the_schedule_is_transformers_linear_warmup_and_decay():
    from transformers import get_linear_schedule_with_warmup

    from loratag.config import TrainConfig

    def lrs(scheduler, optimizer, n):
        out = []
        for _ in range(n):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    model = torch.nn.Linear(3, 2)
    t = TrainConfig(lr=1e-3, warmup_ratio=0.1)
    ours = Optimizer(model, t, 50, torch.device("cpu"), None)
    theirs_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    theirs = get_linear_schedule_with_warmup(theirs_opt, 5, 50)
    assert lrs(ours.scheduler, ours.optimizer, 50) == pytest.approx(lrs(theirs, theirs_opt, 50), abs=1e-12)


def test_the_optimizer_is_fused_adamw_and_steps_as_the_loop_version_does():
    """loratag's AdamW runs fused (one kernel for all tensors; Trainer's default too). Its updates must be the
    loop version's, decay groups included, to float rounding: 20 steps on the same loss."""
    from loratag.config import TrainConfig

    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    loop_model = copy.deepcopy(ours_model)
    start = copy.deepcopy(ours_model)
    t = TrainConfig(lr=1e-2, warmup_ratio=0.0, weight_decay=0.01)
    ours = Optimizer(ours_model, t, 1000, torch.device("cpu"), None)
    assert all(g["fused"] is True for g in ours.optimizer.param_groups)
    loop = torch.optim.AdamW(param_groups(loop_model, 0.01, 1e-2), lr=1e-2, foreach=False, fused=False)
    x = torch.randn(16, 4)
    for _ in range(20):
        for model, opt in ((ours_model, ours.optimizer), (loop_model, loop)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b, s in zip(ours_model.parameters(), loop_model.parameters(), start.parameters(), strict=True):
        assert (a - s).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
