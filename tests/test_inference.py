import json
import random

import pytest
import torch

from loratag.cli import main
from loratag.encoding import plan_windows
from loratag.labels import LabelSet
from loratag.modeling import load_tokenizer
from loratag.tagger import Tagger
from loratag.text import split_sentences, split_words
from loratag.train import train

from .conftest import RESOURCES, guide_lora, guide_train

ADVERSARIAL = [
    "",
    "   \n\n\t ",
    "IL-2 (interleukin-2) and NF-kappa B; [CD4+] T cells.\n\nPU.1 binds 0.05 % of C/EBP-alpha...",
    "Ünïcödé: α-synuclein, β2-microglobulin — “quoted” ‘x’ 😀 ZWSP\u200bhere, e.g. e. coli.",
    "don't it's cells' (( )) [[ ]] {{ }} -- - -- --- ,,, ;;; ::: ??? !!!",
    "Line one.\r\nLine two.\n\n\nLine three without end",
    "a\u00a0b\u2003c\u3000d",  # non-breaking and other unicode spaces
]


def _random_text(rng: random.Random) -> str:
    alphabet = "abcXYZ019-/+.,;:()[]{}\"'%=<>&?! \n\t\u00a0αβ😀\u200b\u0301"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))


@pytest.mark.parametrize("text", ADVERSARIAL + [_random_text(random.Random(i)) for i in range(200)])
def test_words_keep_offsets_and_lose_nothing(text):
    words = split_words(text)
    for w in words:
        assert text[w.start : w.end] == w.text and w.text.strip()
    assert "".join(w.text for w in words) == "".join(text.split())
    assert [w for s in split_sentences(text) for w in s] == words


def test_word_split_agrees_with_genia_tokens():
    gold = [
        ("IL-2 gene expression and NF-kappa B activation.", "IL-2|gene|expression|and|NF-kappa|B|activation|."),
        ("Cells (CD4+, n=5) were e.g. treated.", "Cells|(|CD4+|,|n|=|5|)|were|e.g.|treated|."),
        ("The p53 protein binds DNA. PU.1 does not.", "The|p53|protein|binds|DNA|.|PU.1|does|not|."),
    ]
    for text, tokens in gold:
        assert [w.text for w in split_words(text)] == tokens.split("|")


@pytest.fixture(scope="module")
def local_model(tmp_path_factory, tiny_bert):
    """A 0-layer BERT whose label depends on the token alone (no position, no context): the first sub-token
    of 'NF-kappa' is B-protein, that of 'B' I-protein, everything else O. Windows cannot change its answers."""
    from transformers import BertConfig, BertForTokenClassification

    labels = LabelSet.load(RESOURCES / "tiny/label.json")
    tok = load_tokenizer(str(tiny_bert))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=8,
        num_hidden_layers=0,
        num_attention_heads=1,
        intermediate_size=4,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=labels.id2label,
        label2id=labels.label2id,
    )
    model = BertForTokenClassification(cfg).eval()
    emb = model.bert.embeddings
    with torch.no_grad():
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        emb.word_embeddings.weight.zero_()
        emb.word_embeddings.weight[:, 0] = 10.0
        for word, label in (("NF-kappa", "B-protein"), ("B", "I-protein")):
            first = tok(word, add_special_tokens=False)["input_ids"][0]
            assert first != tok.unk_token_id
            row = emb.word_embeddings.weight[first]
            row.zero_()
            row[labels.label2id[label]] = 10.0
        model.classifier.weight.copy_(torch.eye(len(labels), 8))
        model.classifier.bias.zero_()
    return Tagger(model, tok, labels, max_length=64, precision="fp32")


def test_document_three_times_the_limit_with_an_entity_on_a_window_boundary(local_model):
    tok = local_model.tokenizer
    filler = ["cells", "grow", "the", "gene"] * 60  # no period: one sentence of ~3x the 64-token limit
    hit_boundary = 0
    for k in range(40, 80):
        words = filler[:k] + ["NF-kappa", "B"] + filler[k:]
        text = " ".join(words)
        counts = [len(tok(w, add_special_tokens=False)["input_ids"]) for w in words]
        assert sum(counts) > 3 * 64
        plan = plan_windows(counts, 64 - 2)
        owners = {w: j for j, (_, _, first, last) in enumerate(plan) for w in range(first, last)}
        hit_boundary += owners[k] != owners[k + 1]  # NF-kappa and B are predicted by different windows
        doc = local_model.predict_text(text)
        assert len(doc.words) == len(words) and local_model.word_logits([words]).windowed == 1
        assert [(e.text, e.label) for e in doc.entities] == [("NF-kappa B", "protein")]
        e = doc.entities[0]
        assert text[e.start : e.end] == "NF-kappa B"
    assert hit_boundary >= 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bert):
    from loratag.config import Config

    cfg = Config(
        model=str(tiny_bert),
        data=str(RESOURCES / "tiny"),
        lora=guide_lora(r=4, alpha=8, bias="all"),
        train=guide_train(lr=0.05, batch_size=4, epochs=1, checkpoint_minutes=0),
    )
    return train(cfg, tmp_path_factory.mktemp("runs") / "run", progress=False)


TEXTS = ["IL-2 gene expression requires NF-kappa B.", "T cells express CD28. Human monocytes bind B7 (in vitro)."]


def test_merged_equals_unmerged(tiny_run):
    merged, unmerged = Tagger.load(tiny_run, merge=True), Tagger.load(tiny_run, merge=False)
    assert not hasattr(merged.model, "peft_config") and hasattr(unmerged.model, "peft_config")
    words = [[w.text for w in split_words(t)] for t in TEXTS]
    for a, b in zip(merged.word_logits(words), unmerged.word_logits(words)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_int8_runs_and_scores(tiny_run):
    q = Tagger.load(tiny_run, quantize="int8")
    docs = q.tag_documents(TEXTS)
    assert [len(d.labels) for d in docs] == [len(split_words(t)) for t in TEXTS]


def test_export_loads_in_pipeline(tiny_run, tmp_path, capsys):
    from transformers import AutoModelForTokenClassification, pipeline

    out = tmp_path / "export"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    labels = LabelSet.load(tiny_run / "labels.json")
    assert model.config.id2label == labels.id2label
    tagger = Tagger.load(tiny_run)
    words = [w.text for w in split_words(TEXTS[0])]
    enc = tagger.tokenizer(words, is_split_into_words=True, return_tensors="pt")
    firsts = [p for p, w in enumerate(enc.word_ids()) if w is not None and enc.word_ids()[p - 1] != w]
    with torch.no_grad():
        torch.testing.assert_close(
            model(**enc).logits[0, firsts], tagger.word_logits([words])[0], rtol=1e-4, atol=1e-5
        )
    pipe = pipeline("token-classification", model=str(out))
    result = pipe(TEXTS[0])
    assert all(r["entity"] in labels.labels for r in result)


def test_predict_formats(tiny_run, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    assert main(["predict", str(tiny_run), "--input", str(inp), "--output", str(tmp_path / "out.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == TEXTS
    expected = Tagger.load(tiny_run).tag_documents(TEXTS)
    assert [x["entities"] for x in lines] == [[e.to_dict() for e in d.entities] for d in expected]
    for x in lines:
        for e in x["entities"]:
            assert x["text"][e["start"] : e["end"]] == e["text"] and 0 <= e["score"] <= 1

    conll = tmp_path / "in.conll"
    conll.write_text("IL-2\nbinds\n\n-DOCSTART-\n\nT\tO\ncells\tO\n")
    assert main(["predict", str(tiny_run), "--input", str(conll), "--output", str(tmp_path / "o.conll")]) == 0
    rows = (tmp_path / "o.conll").read_text().split("\n\n")
    assert [[r.split("\t")[0] for r in block.splitlines()] for block in rows if block.strip()] == [
        ["IL-2", "binds"],
        ["T", "cells"],
    ]

    folder = tmp_path / "docs"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(t)
    capsys.readouterr()
    assert main(["predict", str(tiny_run), "--input", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "IL-2" in shown and "T cells" in shown

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert main(["predict", str(tiny_run), "--input", str(bad)]) == 2
    assert 'bad.jsonl:2: expected an object with a string field "text"' in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\nB\xe9ta\n".encode("latin-1"))
    assert main(["predict", str(tiny_run), "--input", str(latin)]) == 2
    assert "latin.txt:2: not UTF-8" in capsys.readouterr().err


def test_highlight_marks_entities():
    from loratag.predict.formats import highlight
    from loratag.tagger import TaggedDocument
    from loratag.text import Entity

    doc = TaggedDocument("NF-kappa B binds", entities=[Entity("NF-kappa B", "protein", 0, 10, 0.9)])
    assert highlight(doc, colour=False, types=["protein"]) == "[NF-kappa B]{protein} binds"
    assert "\033[" in highlight(doc, colour=True, types=["protein"])


def test_evaluate_scores_the_served_path(tiny_run):
    from loratag.data import load_folder
    from loratag.evaluation import evaluate

    corpus = load_folder(RESOURCES / "tiny")
    merged = evaluate(Tagger.load(tiny_run), corpus.splits["test"])
    unmerged = evaluate(Tagger.load(tiny_run, merge=False), corpus.splits["test"])
    assert merged["f1"] == pytest.approx(unmerged["f1"]) and merged["words"] == unmerged["words"]


def test_constrained_decoding_is_viterbi_over_the_word_logits(tiny_run):
    from loratag.data import load_corpus
    from loratag.evaluation import evaluate
    from loratag.labels import viterbi

    words = [json.loads(x)["tokens"] for x in (RESOURCES / "tiny/test.json").read_text().splitlines()]
    tagger = Tagger.load(tiny_run, decode="constrained", precision="fp32")
    names = tagger.labels.labels
    expected = [[names[j] for j in viterbi(w.log_softmax(-1), names)] for w in tagger.word_logits(words)]
    assert [labels for labels, _ in tagger.tag_words(words)] == expected
    result = evaluate(tagger, load_corpus(str(RESOURCES / "tiny")).splits["test"])
    assert result["decode"] == "constrained"
    with pytest.raises(ValueError, match="--decode must be one of"):
        Tagger(tagger.model, tagger.tokenizer, tagger.labels, decode="beam")
