"""--case: an uncased base reads each word's case as its token type, through every path (training, evaluate,
predict, serve stacked, int8, plain PEFT folders, export)."""

import json
import logging
import shutil
from dataclasses import replace

import pytest
import torch

from loratag.encoding import case_bits, collate, encode
from loratag.modeling import load_tokenizer
from loratag.rundir import resolve_adapter
from loratag.tagger import Tagger, export_transformers
from loratag.train import train

WORDS = [["IL-2", "gene", "expression", "requires", "NF-kappa", "B", "."], ["il-2", "gene", "expression"]]


@pytest.fixture(scope="module")
def case_run(tmp_path_factory, tiny_bert):
    from .conftest import tagging_cfg

    cfg = tagging_cfg(tiny_bert)
    cfg = replace(cfg, train=replace(cfg.train, epochs=6, case=True))
    return train(cfg, tmp_path_factory.mktemp("case-run") / "run", progress=False)


def test_each_sub_token_carries_its_words_case_context_included(tiny_bert):
    tok = load_tokenizer(str(tiny_bert))
    windows, _ = encode(tok, WORDS, 64, case=True)
    for w in windows:
        assert w.type_ids == case_bits(WORDS[w.sentence], w.word_ids)
        assert len(w.type_ids) == len(w.input_ids)
    first = windows[0]
    assert [first.type_ids[k] for k, wid in enumerate(first.word_ids) if wid == 0] == [1] * 4  # "il - 2" pieces
    assert {first.type_ids[k] for k, wid in enumerate(first.word_ids) if wid in (1, 2, 3, 6)} == {0}
    assert first.type_ids[0] == first.type_ids[-1] == 0  # [CLS], [SEP]
    assert set(windows[1].type_ids) == {0}  # the same words lower-cased
    # context: the other sentence's sub-tokens carry their own words' case
    ctx = [(["The", "IL-2"], []), ([], ["NF-kappa", "B"])]
    with_ctx, _ = encode(tok, [["gene"], ["gene"]], 64, contexts=ctx, context=16, case=True)
    for w, (left, right) in zip(with_ctx, ctx):
        body = [k for k, wid in enumerate(w.word_ids) if wid is not None]
        assert [w.type_ids[k] for k in body] == [0]
        assert sum(w.type_ids) == sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in left + right)
    # a batch of windows with and without types (adapters trained with and without --case): zeros for the latter
    plain, _ = encode(tok, WORDS, 64)
    batch = collate([windows[0], plain[0]], tok.pad_token_id)
    assert batch["token_type_ids"][0, : len(windows[0].type_ids)].tolist() == list(windows[0].type_ids)
    assert batch["token_type_ids"][1].sum() == 0
    assert "token_type_ids" not in collate(plain, tok.pad_token_id)


def test_a_case_run_trains_the_token_type_table_and_reads_case_everywhere(case_run, tagging_run):
    assert json.loads((case_run / "config.json").read_text())["train"]["case"] is True
    acfg = json.loads((case_run / "adapter" / "adapter_config.json").read_text())
    assert "token_type_embeddings" in acfg["modules_to_save"]
    tagger = Tagger.load(case_run, precision="fp32")
    assert tagger.case
    # row 0 (special tokens, lower-case words) stays the base's; row 1 learned what case adds
    from safetensors.torch import load_file
    from transformers import AutoModel

    table = next(
        v for k, v in load_file(case_run / "adapter" / "adapter_model.safetensors").items() if "token_type" in k
    )
    base = AutoModel.from_pretrained(json.loads((case_run / "config.json").read_text())["model"])
    assert torch.equal(table[0], base.embeddings.token_type_embeddings.weight[0])
    assert not torch.allclose(table[1], table[0])
    upper, lower = tagger.word_logits([WORDS[0][:3], WORDS[1]])
    assert not torch.allclose(upper, lower), "case changed nothing the model sees"
    # an uncased run reads the two alike: the tokenizer lower-cases
    plain = Tagger.load(tagging_run, precision="fp32")
    assert not plain.case
    a, b = plain.word_logits([WORDS[0][:3], WORDS[1]])
    assert torch.allclose(a, b)
    # raw text (predict, serve) reads the same case as pre-split words
    doc = tagger.tag_documents(["IL-2 gene expression"])[0]
    assert doc.labels == tagger.tag_words([WORDS[0][:3]])[0][0]
    assert "Token types (--case)" in (case_run / "README.md").read_text()


def test_a_plain_peft_folder_of_a_case_run_is_read_with_case_and_says_so(case_run, tmp_path, caplog):
    folder = tmp_path / "adapter"
    shutil.copytree(case_run / "adapter", folder)
    shutil.copy(case_run / "labels.json", tmp_path / "label.json")
    from loratag.labels import LabelSet

    with caplog.at_level(logging.INFO, logger="loratag"):
        ref = resolve_adapter(folder, labels=LabelSet.load(tmp_path / "label.json"), base=None)
    assert ref.case
    assert "as loratag --case does" in caplog.text


def test_served_stacked_beside_an_uncased_adapter_each_answers_as_alone(case_run, tagging_run):
    from loratag.serve.pool import AdapterPool

    pool = AdapterPool([(case_run, "cased"), (tagging_run, "plain")])
    assert not pool.merged
    texts = ["IL-2 gene expression requires NF-kappa B.", "il-2 gene expression requires nf-kappa b."]
    mixed = pool.tag(["cased", "plain", "plain", "cased"], [texts[0], texts[0], texts[1], texts[1]])
    for run, got in ((case_run, [mixed[0], mixed[3]]), (tagging_run, [mixed[1], mixed[2]])):
        alone = Tagger.load(run, precision="fp32").tag_documents(texts)
        for g, a in zip(got, alone):
            assert g.labels == a.labels
            assert g.scores == pytest.approx(a.scores, abs=1e-4)
    assert mixed[0].scores != mixed[3].scores  # the cased adapter told the two texts apart: the check is not empty
    listed = {a.name: a.case for a in pool.adapters.values()}
    assert listed == {"cased": True, "plain": False}


def test_int8_and_the_transformers_export_of_a_case_run(case_run, tmp_path, caplog):
    float_tagger = Tagger.load(case_run, precision="fp32")
    q = Tagger.load(case_run, quantize="int8")
    assert q.case
    upper, lower = q.word_logits([WORDS[0][:3], WORDS[1]])
    assert not torch.allclose(upper, lower), "the int8 model was not given the token types"
    f_upper = float_tagger.word_logits([WORDS[0][:3]])[0]
    assert (upper.argmax(-1) == f_upper.argmax(-1)).float().mean() >= 2 / 3
    with caplog.at_level(logging.WARNING, logger="loratag"):
        export_transformers(float_tagger, tmp_path / "hf")
    assert "pipeline" in caplog.text
    assert "--case" in json.loads((tmp_path / "hf" / "config.json").read_text())["loratag_token_types"]
    from loratag.onnxrt import export_dir

    record = export_dir(float_tagger, tmp_path / "onnx")
    assert record["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert "--case" in record["token_type_ids"]


def test_auto_turns_case_on_for_an_uncased_base_with_two_token_types_and_says_so(tiny_bert, tiny_roberta, caplog):
    from transformers import AutoConfig

    from loratag.modeling import auto_case

    bert = (load_tokenizer(str(tiny_bert)), AutoConfig.from_pretrained(tiny_bert))
    assert auto_case(*bert, None) == (True, "the base's tokenizer lower-cases and it has two token types")
    assert auto_case(*bert, 2)[0] is False  # --lora-top-layers caches the layers below the table
    roberta = (load_tokenizer(str(tiny_roberta)), AutoConfig.from_pretrained(tiny_roberta))
    assert auto_case(*roberta, None) == (False, "the base's tokenizer keeps case")


def test_a_run_records_what_auto_resolved_to(tiny_cfg, tmp_path, caplog):
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, case=None, epochs=1))
    with caplog.at_level(logging.INFO, logger="loratag"):
        run = train(cfg, tmp_path / "run", progress=False)
    assert json.loads((run / "config.json").read_text())["train"]["case"] is True
    assert "--case auto: on" in caplog.text
    assert Tagger.load(run).case


def test_auto_is_a_value_of_case_only(tmp_path, capsys):
    from loratag.cli import build_parser

    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert getattr(build_parser().parse_args([*args, "--case", "auto"]), "train.case") is None
    with pytest.raises(SystemExit):  # "auto" is no time budget: argparse names the flag and the value
        build_parser().parse_args([*args, "--time-budget", "auto"])
    assert "--time-budget" in capsys.readouterr().err


def test_case_needs_two_token_types(tiny_roberta, tmp_path):
    from .conftest import tagging_cfg

    cfg = tagging_cfg(tiny_roberta)
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, case=True))
    with pytest.raises(ValueError, match="--case needs a base with two token types"):
        train(cfg, tmp_path / "run", progress=False)


def test_case_and_cached_lower_layers_are_refused_together():
    from loratag.config import Config, LoraSettings, TrainConfig

    with pytest.raises(ValueError, match="--case trains the token-type table, below the layers"):
        Config(lora=LoraSettings(top_layers=2), train=TrainConfig(case=True))


def test_runs_with_and_without_case_are_not_averaged(case_run, tagging_run, tmp_path):
    from loratag.average import average_runs

    with pytest.raises(ValueError, match="not averaged"):
        average_runs([case_run, tagging_run], tmp_path / "avg")
