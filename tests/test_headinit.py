"""--head-init labels: the head starts as the discriminant of the base's features for each label."""

import json
from dataclasses import replace

import pytest
import torch

from loratag.train import train
from loratag.train.headinit import discriminant


def test_the_discriminant_separates_labels_and_keeps_an_absent_one_possible():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 3
    y = torch.cat([torch.zeros(300), torch.ones(60), torch.full((40,), 2)]).long()
    x = centres[y] + torch.randn(len(y), 16)
    weight, bias, temperature = discriminant(x, y, k=4)  # label 3 never seen
    assert weight.shape == (4, 16) and bias.shape == (4,)
    assert ((x @ weight.T + bias).argmax(1) == y).float().mean() > 0.95
    probs = (x @ weight.T + bias).softmax(1)
    assert 0 < probs[:, 3].max() < 0.05  # unlikely, not impossible
    # the temperature is the one with the lowest cross-entropy on the sample
    logits = (x @ weight.T + bias) / temperature
    fitted = torch.nn.functional.cross_entropy(logits * temperature, y)
    for t in (temperature * 4, temperature / 4):
        assert fitted <= torch.nn.functional.cross_entropy(logits * t, y) + 1e-6


def test_a_run_with_a_label_aware_head_records_it_and_starts_from_it(tiny_cfg, tmp_path):
    from safetensors.torch import load_file

    def head_after_one_tiny_step(head_init):
        cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, head_init=head_init, epochs=1, lr=1e-12))
        run = train(cfg, tmp_path / head_init, progress=False, stop_after_steps=1)
        tensors = load_file(run / "adapter" / "adapter_model.safetensors")
        return run, next(v for k, v in tensors.items() if "classifier" in k and k.endswith("weight"))

    run, head = head_after_one_tiny_step("labels")
    facts = json.loads((run / "config.json").read_text())["run"]["head_init"]
    assert facts["words"] > 0 and facts["windows"] > 0 and 0 <= facts["sample_accuracy"] <= 1
    # the discriminant's rows are centred (their sum over labels is 0); a random head's are not
    assert head.sum(0).abs().max() < 1e-4 * head.abs().max()
    _, random_head = head_after_one_tiny_step("random")
    assert random_head.sum(0).abs().max() > 1e-2 * random_head.abs().max()
    with pytest.raises(ValueError, match="--head-init"):
        replace(tiny_cfg.train, head_init="lda")
