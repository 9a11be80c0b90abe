"""Stacked multi-adapter inference (multilora.py) against PEFT's own mixed-batch path."""

import pytest
import torch

from loratag.serve import multilora


def _peft_model(base_dir, configs: dict):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    base = AutoModelForTokenClassification.from_pretrained(base_dir, num_labels=5)
    names = list(configs)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.TOKEN_CLS, **configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(task_type=TaskType.TOKEN_CLS, **configs[name]))
    with torch.no_grad():  # LoRA B starts at zero and every head as a copy: make the adapters differ
        for pname, p in model.named_parameters():
            if "lora_" in pname or "modules_to_save" in pname:
                p.normal_(0, 0.3)
    return model.eval()


CONFIGS = {
    "genes": {"r": 4, "lora_alpha": 8},
    "cells": {"r": 8, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"]},  # other rank, layers
    "drugs": {"r": 2, "lora_alpha": 4, "use_rslora": True},  # another scaling rule
}


def _batch(n=6, length=9):
    torch.manual_seed(1)
    ids = torch.randint(5, 60, (n, length))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding in some rows
    mask[4, 3:] = 0
    return ids, mask


def test_stacked_adapters_match_peft_mixed_batches_and_each_adapter_alone(tiny_bert):
    model = _peft_model(tiny_bert, CONFIGS)
    ids, mask = _batch()
    rows = ["genes", "cells", "drugs", "cells", "genes", "drugs"]
    with torch.no_grad():
        peft_mixed = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        alone = {}
        for name in CONFIGS:
            model.set_adapter(name)
            alone[name] = model(input_ids=ids, attention_mask=mask).logits
        stacked = multilora.build(model, list(CONFIGS))
        assert stacked is not None
        got = stacked(ids, mask, adapter_names=rows).logits
    for r, name in enumerate(rows):
        keep = mask[r].bool()
        assert torch.allclose(got[r][keep], peft_mixed[r][keep], atol=1e-5)
        assert torch.allclose(got[r][keep], alone[name][r][keep], atol=1e-5)
    assert not torch.allclose(alone["genes"], alone["cells"]), "the adapters are the same; the check would be empty"
    assert not any("lora" in type(m).__name__.lower() and "Multi" not in type(m).__name__ for m in stacked.modules())


def test_a_row_answer_does_not_depend_on_its_batch(tiny_bert):
    model = _peft_model(tiny_bert, CONFIGS)
    stacked = multilora.build(model, list(CONFIGS))
    ids, mask = _batch()
    with torch.no_grad():
        mixed = stacked(ids, mask, adapter_names=["drugs", "genes", "cells", "genes", "drugs", "cells"]).logits
        single = stacked(ids[2:3], mask[2:3], adapter_names=["cells"]).logits
    assert torch.allclose(mixed[2], single[0], atol=1e-5)


def test_threads_each_use_their_own_rows(tiny_bert):
    from concurrent.futures import ThreadPoolExecutor

    model = _peft_model(tiny_bert, CONFIGS)
    stacked = multilora.build(model, list(CONFIGS))
    ids, mask = _batch()
    with torch.no_grad():
        expected = {n: stacked(ids, mask, adapter_names=[n] * 6).logits for n in CONFIGS}

        def run(name):
            return name, [stacked(ids, mask, adapter_names=[name] * 6).logits for _ in range(20)]

        with ThreadPoolExecutor(3) as ex:
            for name, outs in ex.map(run, list(CONFIGS) * 2):
                assert all(torch.allclose(o, expected[name], atol=1e-5) for o in outs)


def test_lora_on_embeddings_stacks_and_matches_peft(tiny_bert):
    configs = {"emb": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "word_embeddings"]}, "plain": {"r": 2}}
    model = _peft_model(tiny_bert, configs)
    ids, mask = _batch()
    rows = ["emb", "plain", "emb", "emb", "plain", "emb"]
    with torch.no_grad():
        alone = {}
        for name in configs:
            model.set_adapter(name)
            alone[name] = model(input_ids=ids, attention_mask=mask).logits
        got = multilora.build(model, list(configs))(ids, mask, adapter_names=rows).logits
    for r, name in enumerate(rows):
        keep = mask[r].bool()
        torch.testing.assert_close(got[r][keep], alone[name][r][keep], rtol=1e-5, atol=1e-5)


def test_stacks_installed_while_passes_run_never_mix(tiny_bert):
    """A pass pinned to a stack keeps it while another stack (an adapter removed, one added) is installed; a new
    adapter's modules wrapped meanwhile act as the base for the older stack."""
    model = _peft_model(tiny_bert, CONFIGS)
    ids, mask = _batch()
    with torch.no_grad():
        model.set_adapter("cells")
        expected = model(input_ids=ids, attention_mask=mask).logits
    weights = {n: multilora.weights_of(model, n) for n in CONFIGS}
    served = multilora.MultiLoraModel(_peft_model(tiny_bert, {"x": {"r": 1}}).base_model.model)  # LoRA on none
    with torch.no_grad():
        for m in served.modules():
            for p in getattr(m, "lora_B", {}).values():
                p.weight.zero_()  # adapter "x" does nothing: the plain base, PEFT layers left where served is not
    old = multilora.stack(["genes", "drugs"], [weights["genes"], weights["drugs"]], served.model)
    served.install(old)
    with torch.no_grad():
        before = served(ids, mask, adapter_names=["genes"] * 6).logits
        new = multilora.stack(["cells"], [weights["cells"]], served.model)  # LoRA on key and dense too
        with served.pinned(old):
            served.install(new)
            pinned = served(ids, mask, adapter_names=["genes"] * 6).logits
        with pytest.raises(KeyError):
            served(ids, mask, adapter_names=["genes"] * 6)  # gone from the current stack
        cells = served(ids, mask, adapter_names=["cells"] * 6).logits
    torch.testing.assert_close(pinned, before)
    keep = mask.bool()
    torch.testing.assert_close(cells[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cells, before, atol=1e-3)


def test_what_cannot_be_stacked_is_left_to_peft(tiny_bert):
    model = _peft_model(tiny_bert, {"genes": {"r": 4}, "dora": {"r": 4, "use_dora": True}})
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(multilora.Unstackable, match="'dora' uses DoRA"):
        multilora.build(model, ["genes", "dora"])
    assert {n: type(m) for n, m in model.named_modules()} == before, "the PEFT model was changed"


def test_adapter_names_are_required(tiny_bert):
    stacked = multilora.build(_peft_model(tiny_bert, CONFIGS), list(CONFIGS))
    ids, mask = _batch()
    with pytest.raises(ValueError, match="one adapter name per row"):
        stacked(ids, mask)
    with pytest.raises(KeyError):
        stacked(ids, mask, adapter_names=["zzz"] * 6)


def test_per_row_biases_match_each_adapter_with_its_biases_in_the_base(tiny_bert):
    """Row biases (bias "all" adapters): each row computes what the base with that adapter's biases written into
    it computes, and a row of an adapter without trained biases what the untouched base computes."""
    configs = {"biased": {"r": 4, "lora_alpha": 8}, "norm-only": {"r": 2, "lora_alpha": 4}, "none": {"r": 4}}
    model = _peft_model(tiny_bert, configs)  # LoRA on query and value only
    names = list(configs)
    base = model.base_model.model
    linear = "bert.encoder.layer.0.attention.self.key"  # a plain Linear: no adapter has LoRA there
    lora = "bert.encoder.layer.1.attention.self.query"  # LoRA-adapted: its base layer's bias
    norm = "bert.embeddings.LayerNorm"
    torch.manual_seed(3)
    own = {
        m: base.get_submodule(m).get_base_layer().bias if m == lora else base.get_submodule(m).bias
        for m in (linear, lora, norm)
    }
    biases = [{m: v.detach() + torch.randn_like(v) for m, v in own.items()}, {norm: own[norm].detach() - 1.0}, {}]
    ids, mask = _batch()
    rows = [names[i % len(names)] for i in range(len(ids))]
    expected = []
    for r, name in enumerate(rows):
        saved = {m: v.detach().clone() for m, v in own.items()}
        with torch.no_grad():
            for m, v in biases[names.index(name)].items():
                own[m].copy_(v)
            model.set_adapter(name)
            expected.append(model(input_ids=ids[r : r + 1], attention_mask=mask[r : r + 1]).logits[0])
            for m, v in saved.items():
                own[m].copy_(v)
    with torch.no_grad():
        model.set_adapter("biased")
        unbiased = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0]
    assert not torch.allclose(expected[0], unbiased, atol=1e-3), "the biases changed nothing; an empty check"
    stacked = multilora.build(model, names, biases)
    kinds = {type(stacked.model.get_submodule(m)).__name__ for m in (linear, lora, norm)}
    assert kinds == {"StackedLinear", "StackedLayerNorm"}
    assert linear in stacked.stack.biases and linear not in stacked.stack.lora and lora in stacked.stack.lora
    with torch.no_grad():
        got = stacked(ids, mask, adapter_names=rows).logits
    for r in range(len(ids)):
        n = int(mask[r].sum())
        torch.testing.assert_close(got[r, :n], expected[r][:n], rtol=1e-5, atol=1e-5)
