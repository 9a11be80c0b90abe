"""Stacked multi-adapter inference (multilora.py) against PEFT's own mixed-batch path."""

import pytest
import torch

from loratag import multilora


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


def test_what_cannot_be_stacked_is_left_to_peft(tiny_bert):
    model = _peft_model(tiny_bert, {"genes": {"r": 4}, "dora": {"r": 4, "use_dora": True}})
    before = {n: type(m) for n, m in model.named_modules()}
    assert multilora.build(model, ["genes", "dora"]) is None
    assert {n: type(m) for n, m in model.named_modules()} == before, "the PEFT model was changed"


def test_adapter_names_are_required(tiny_bert):
    stacked = multilora.build(_peft_model(tiny_bert, CONFIGS), list(CONFIGS))
    ids, mask = _batch()
    with pytest.raises(ValueError, match="one adapter name per row"):
        stacked(ids, mask)
    with pytest.raises(KeyError):
        stacked(ids, mask, adapter_names=["zzz"] * 6)
