"""--crf: a linear-chain CRF trained with the adapter; its scores decode every path (evaluate, predict, serve, int8),
travel with the adapter (transitions.json) and say where they are not read (export)."""

import itertools
import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loratag.crf import CRF, FORBIDDEN, MODULE, crf_loss, word_emissions
from loratag.labels import TRANSITIONS, Transitions, may_follow, viterbi_many
from loratag.tagger import Tagger, export_transformers
from loratag.train import train

LABELS = ["O", "B-DNA", "I-DNA", "B-RNA", "I-RNA"]


def _random_crf(seed=0) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(LABELS)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    return crf


def _path_score(crf, emissions, path, rule):
    allowed, _ = may_follow(LABELS)
    s = crf.start[path[0]] + emissions[0, path[0]]
    for t in range(1, len(path)):
        s = s + emissions[t, path[t]] + crf.transitions[path[t - 1], path[t]]
        s = s + (0.0 if allowed[path[t - 1]][path[t]] or not rule else FORBIDDEN)
    return s + crf.end[path[-1]]


def test_the_loss_is_the_log_partition_over_iob2_paths_minus_the_gold_score():
    crf = _random_crf()
    emissions = torch.randn(3, 4, len(LABELS))
    tags = torch.tensor([[1, 2, 0, 3], [0, 1, 0, 0], [3, 4, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    expected = 0.0
    for r in range(3):
        n = int(mask[r].sum())
        paths = itertools.product(range(len(LABELS)), repeat=n)
        log_z = torch.logsumexp(torch.stack([_path_score(crf, emissions[r, :n], p, True) for p in paths]), 0)
        expected += log_z - _path_score(crf, emissions[r, :n], tags[r, :n].tolist(), False)
    got = crf.nll(emissions, tags, mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert crf.transitions.grad.abs().sum() > 0 and crf.start.grad.abs().sum() > 0


def test_word_emissions_take_each_windows_labelled_positions_in_order():
    logits = torch.randn(3, 6, 5)
    gold = torch.full((3, 6), -100)
    gold[0, [1, 3, 4]] = torch.tensor([1, 2, 0])
    gold[2, [2]] = 3  # row 1 owns no word: dropped
    emissions, tags, mask = word_emissions(logits, gold, -100)
    assert emissions.shape == (2, 3, 5)
    assert torch.equal(emissions[0], logits[0, [1, 3, 4]]) and torch.equal(emissions[1, 0], logits[2, 2])
    assert tags.tolist() == [[1, 2, 0], [3, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
    # as the cross-entropy: summed, divided per labelled word; no word at all is a zero loss, not an error
    loss, total = crf_loss(CRF(LABELS), logits, gold, divisor=4, world=1, ignore=-100)
    assert loss.item() == pytest.approx(total.item() / 4)
    # with the words' cross-entropy beside it (--crf-token-loss): the two sums added
    both = crf_loss(CRF(LABELS), logits, gold, divisor=4, world=1, ignore=-100, token=0.5)[1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=-100, reduction="sum")
    assert both.item() == pytest.approx(total.item() + 0.5 * ce.item(), rel=1e-6)
    empty = crf_loss(CRF(LABELS), logits, torch.full((3, 6), -100), divisor=4, world=1, ignore=-100)
    assert empty[0].item() == 0.0


def test_decoding_with_learned_scores_finds_the_best_valid_path_and_zero_scores_change_nothing():
    scores = _random_crf(1).export()
    learned, first, last = scores.arrays()
    allowed, opens = may_follow(LABELS)
    rng = np.random.default_rng(0)
    sentences = [np.log(rng.dirichlet(np.ones(len(LABELS)), n)).astype(np.float32) for n in (1, 2, 4, 5)]
    for x, got in zip(sentences, viterbi_many(sentences, LABELS, transitions=scores)):
        best = max(
            (p for p in itertools.product(range(len(LABELS)), repeat=len(x))
             if opens[p[0]] and all(allowed[a][b] for a, b in zip(p, p[1:]))),
            key=lambda p: first[p[0]] + x[0, p[0]] + last[p[-1]]
            + sum(x[t, p[t]] + learned[p[t - 1], p[t]] for t in range(1, len(p))),
        )  # fmt: skip
        assert got == list(best)
    zero = CRF(LABELS).export()
    assert viterbi_many(sentences, LABELS, transitions=zero) == viterbi_many(sentences, LABELS)


def test_crf_without_constrained_decoding_is_refused():
    from loratag.config import TrainConfig

    with pytest.raises(ValueError, match="--decode constrained"):
        TrainConfig(crf=True, decode="argmax")
    with pytest.raises(ValueError, match="--crf-token-loss must be >= 0"):
        TrainConfig(crf=True, crf_token_loss=-1)


def test_transitions_for_another_label_order_are_refused():
    d = CRF(LABELS).export().to_dict(LABELS)
    with pytest.raises(ValueError, match="adapter's are"):
        Transitions.from_dict(d, list(reversed(LABELS)), "x/transitions.json")
    with pytest.raises(ValueError, match="5x5"):
        Transitions.from_dict({**d, "start": [0.0]}, LABELS, "x/transitions.json")


@pytest.fixture(scope="module")
def crf_run(tmp_path_factory, tiny_bert):
    from .conftest import tagging_cfg

    cfg = tagging_cfg(tiny_bert)
    cfg = replace(cfg, train=replace(cfg.train, epochs=6, crf=True, crf_lr=0.05, decode="constrained"))
    return train(cfg, tmp_path_factory.mktemp("crf-run") / "run", progress=False)


def test_a_crf_run_saves_its_scores_beside_each_adapter_and_serves_the_f1_it_reports(crf_run):
    from loratag.config import Config
    from loratag.corpus import load
    from loratag.evaluation import evaluate

    labels = list(json.loads((crf_run / "labels.json").read_text()))
    for folder in ("adapter", "last"):
        saved = json.loads((crf_run / folder / TRANSITIONS).read_text())
        assert saved["labels"] == labels
        assert np.abs(np.array(saved["scores"])).max() > 0  # trained: they start at 0
        assert not any(MODULE in k for k in load_file(crf_run / folder / "adapter_model.safetensors"))
    kept = Transitions.from_dict(json.loads((crf_run / "adapter" / TRANSITIONS).read_text()), labels, "")
    tagger = Tagger.load(crf_run, precision="fp32")
    assert tagger.labels.transitions == kept
    cfg = Config.load(crf_run / "config.json")
    test = load(cfg.data, cfg.corpus, cfg.train.seed).splits["test"]
    reported = json.loads((crf_run / "metrics.json").read_text())["test"]
    assert evaluate(tagger, test)["f1"] == reported["f1"]
    argmax = reported["by_decode"]["argmax"]["f1"]
    assert "CRF (--crf): trained with --crf" in (crf_run / "README.md").read_text()
    assert f"(test F1 by argmax: {argmax:.4f})" in (crf_run / "README.md").read_text()
    # the scores reach the decoder: a start score that outweighs any word makes every sentence open with B-X
    b = labels[1]
    opens_b = Transitions(kept.scores, tuple(100.0 if x == b else -100.0 for x in labels), kept.end)
    logits = tagger.word_logits([s.tokens for s in test])
    assert any(lab[0] != b for lab, _ in tagger.decode_logits(logits))
    forced = tagger.decode_logits(logits, [replace(tagger.labels, transitions=opens_b)] * len(logits))
    assert all(lab[0] == b for lab, _ in forced)
    assert [p for _, p in forced] != []  # probabilities stay each word's softmax


def test_resume_restores_the_crf_scores_exactly(crf_run, tmp_path, monkeypatch):
    from loratag import rundir
    from loratag.config import Config

    cfg = Config.load(crf_run / "config.json")
    cfg = replace(cfg, train=replace(cfg.train, epochs=2, checkpoint_minutes=1e-9))
    full = train(cfg, tmp_path / "full", progress=False)
    original, calls = rundir.save_checkpoint, {"n": 0}

    def save(*a, **kw):
        original(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(rundir, "save_checkpoint", save)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "killed", progress=False)
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    for folder in ("adapter", "last"):
        a, b = (json.loads((r / folder / TRANSITIONS).read_text()) for r in (full, resumed))
        assert a == b


def test_served_beside_a_run_without_crf_each_answers_as_alone(crf_run, tagging_run):
    from loratag.serve.pool import AdapterPool

    pool = AdapterPool([(crf_run, "crf"), (tagging_run, "plain")])
    texts = ["IL-2 gene expression requires NF-kappa B.", "The cells express CD28 and the IL-2 receptor."]
    mixed = pool.tag(["crf", "plain", "plain", "crf"], [texts[0], texts[0], texts[1], texts[1]])
    for run, got in ((crf_run, [mixed[0], mixed[3]]), (tagging_run, [mixed[1], mixed[2]])):
        alone = Tagger.load(run, precision="fp32").tag_documents(texts)
        for g, a in zip(got, alone):
            assert g.labels == a.labels
            assert g.scores == pytest.approx(a.scores, abs=1e-4)
    # the rows of the CRF run decode with its scores (each adapter's label set carries its own)
    served = {a.name: a.labels.transitions for a in pool.adapters.values()}
    assert served["crf"] == Tagger.load(crf_run, precision="fp32").labels.transitions and served["plain"] is None


def test_the_optimizer_gives_the_crf_its_own_rate_and_no_decay():
    from loratag.train.optim import param_groups

    model = torch.nn.Module()
    model.classifier = torch.nn.Linear(4, 5)
    model.add_module(MODULE, CRF(LABELS))
    groups = param_groups(model, 0.01, 2e-3, crf_lr=0.05)
    crf = [g for g in groups if any(p is model.loratag_crf.transitions for p in g["params"])]
    assert len(crf) == 1 and crf[0]["lr"] == 0.05 and crf[0]["weight_decay"] == 0.0 and len(crf[0]["params"]) == 3
    assert all(g["lr"] == 2e-3 for g in groups if g is not crf[0])


def test_int8_export_and_average_carry_the_scores(crf_run, tagging_run, tmp_path, caplog):
    from loratag.average import average_runs
    from loratag.onnxrt import export_dir

    float_tagger = Tagger.load(crf_run, precision="fp32")
    assert Tagger.load(crf_run, quantize="int8").labels.transitions == float_tagger.labels.transitions
    record = export_dir(float_tagger, tmp_path / "onnx")
    assert record["crf"]["scores"] == [list(r) for r in float_tagger.labels.transitions.scores]
    with caplog.at_level(logging.WARNING, logger="loratag"):
        export_transformers(float_tagger, tmp_path / "hf")
    assert "argmax" in caplog.text
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["loratag_crf"]["labels"][0] == "O"
    averaged = tmp_path / "avg"
    average_runs([crf_run, crf_run / "last"], averaged, evaluate_splits=())
    mean = json.loads((averaged / "adapter" / TRANSITIONS).read_text())
    a, b = (json.loads((f / TRANSITIONS).read_text()) for f in (crf_run / "adapter", crf_run / "last"))
    assert np.allclose(mean["scores"], (np.array(a["scores"]) + np.array(b["scores"])) / 2)
    with pytest.raises(ValueError, match="train.crf"):
        average_runs([crf_run, tagging_run], tmp_path / "mixed", evaluate_splits=())


def test_auto_is_on_with_constrained_decoding_and_a_run_from_before_crf_reads_as_without(caplog):
    from loratag.config import Config, TrainConfig
    from loratag.crf import auto_crf

    with caplog.at_level(logging.INFO, logger="loratag"):
        assert auto_crf(TrainConfig()) is True and auto_crf(TrainConfig(decode="argmax")) is False
    assert "--crf auto: on (--decode constrained)" in caplog.text
    assert auto_crf(TrainConfig(crf=False)) is False
    old_run = {"model": "minilm", "train": {"decode": "constrained"}, "run": {"trainable_params": 1}}
    assert Config.from_dict(old_run).train.crf is False  # its adapter has no CRF: not read as auto
    assert Config.from_dict({"model": "minilm", "train": {}}).train.crf is None  # a user's settings file: auto


def test_argmax_asked_of_a_crf_run_is_done_and_said(crf_run, caplog):
    with caplog.at_level(logging.WARNING, logger="loratag"):
        tagger = Tagger.load(crf_run, precision="fp32", decode="argmax")
    assert tagger.decode == "argmax" and "leaves its CRF out" in caplog.text
