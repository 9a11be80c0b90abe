"""Document context (--context, FLERT): each sentence read with its document around it, at training and at every
prediction path, labels and outputs on the sentence alone."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loratag.encoding import IGNORE, align_labels, document_contexts, encode
from loratag.evaluation import evaluate
from loratag.modeling import load_tokenizer
from loratag.predict.formats import _conll_words, tag_pre_split
from loratag.tagger import Tagger
from loratag.train import train

from .conftest import RESOURCES


def test_contexts_take_neighbours_of_the_same_document_only():
    sents = [["a", "b"], ["c"], ["d", "e", "f"], ["g"], ["h"]]
    ctx = document_contexts(sents, ["x", "x", "x", "y", None], 2)
    assert ctx[0] == ([], ["c", "d"])
    assert ctx[1] == (["a", "b"], ["d", "e"])
    assert ctx[2] == (["b", "c"], [])  # the nearest words, at most 2
    assert ctx[3] == ([], []) and ctx[4] == ([], [])  # a document of its own; no document
    assert document_contexts(sents, None, 2) is None and document_contexts(sents, ["x"] * 5, 0) is None


def test_context_tokens_are_never_labelled_and_the_sentence_keeps_its_word_ids(tiny_bert):
    tok = load_tokenizer(str(tiny_bert))
    sents = [["IL-2", "gene", "expression"], ["requires", "NF-kappa", "B", "."], ["Human", "monocytes"]]
    alone, _ = encode(tok, sents, 64)
    ctx = document_contexts(sents, [0, 0, 0], 64)
    read, _ = encode(tok, sents, 64, contexts=ctx, context=3)
    for a, b in zip(alone, read):
        assert [w for w in b.word_ids if w is not None] == [w for w in a.word_ids if w is not None]
        body = [len([w for w in x.word_ids if w is not None]) for x in alone]
        i = b.sentence
        expect = (min(3, body[i - 1]) if i > 0 else 0) + (min(3, body[i + 1]) if i < 2 else 0)
        assert len(b.input_ids) - len(a.input_ids) == expect
        assert b.input_ids[0] == a.input_ids[0] and b.input_ids[-1] == a.input_ids[-1]  # inside the specials
        labels = align_labels(b.word_ids, list(range(len(sents[b.sentence]))))
        assert [x for x in labels if x != IGNORE] == list(range(len(sents[b.sentence])))  # each word once
    # the middle sentence's left context is the end of the first sentence's sub-tokens
    first = [i for i, w in zip(alone[0].input_ids, alone[0].word_ids) if w is not None]
    assert list(read[1].input_ids[1:4]) == first[-3:]
    # max_length bounds the whole: the sides share what is left
    tight, _ = encode(tok, sents, 14, contexts=ctx, context=64)
    assert all(len(w.input_ids) <= 14 for w in tight)
    # per-sentence sizes (adapters trained differently, in one batch)
    mixed, _ = encode(tok, sents, 64, contexts=ctx, context=[0, 3, 0])
    assert mixed[0] == alone[0] and mixed[2] == alone[2] and mixed[1] == read[1]


def test_a_windowed_sentence_is_read_without_context(tiny_bert):
    tok = load_tokenizer(str(tiny_bert))
    long = ["IL-2"] * 40  # longer than max_length 32: windows
    sents = [["a", "gene"], long]
    ctx = document_contexts(sents, [0, 0], 64)
    alone, n = encode(tok, sents, 32)
    read, m = encode(tok, sents, 32, contexts=ctx, context=8)
    assert n == m == 1
    assert [w for w in read if w.sentence == 1] == [w for w in alone if w.sentence == 1]
    assert len(read[0].input_ids) > len(alone[0].input_ids)


@pytest.fixture(scope="module")
def context_data(tmp_path_factory) -> Path:
    """The tiny corpus with documents.tsv: training sentences in documents of 3, validation and test of 2."""
    d = tmp_path_factory.mktemp("tiny-docs")
    for p in (RESOURCES / "tiny").iterdir():
        shutil.copy2(p, d / p.name)
    rows = ["split\tdoc_id\tsentences"]
    for split in ("train", "validation", "test"):
        n = len((d / f"{split}.json").read_text().splitlines())
        size = 3 if split == "train" else 2
        rows += [f"{split}\t{split}{k}\t{min(size, n - k)}" for k in range(0, n, size)]
    (d / "documents.tsv").write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture(scope="module")
def context_run(tmp_path_factory, tiny_bert, context_data) -> Path:
    from .conftest import tagging_cfg

    cfg = tagging_cfg(tiny_bert)
    cfg = replace(cfg, data=str(context_data), train=replace(cfg.train, epochs=3, context=16))
    return train(cfg, tmp_path_factory.mktemp("context-run") / "run", progress=False)


def test_the_run_keeps_its_context_and_every_path_reads_documents_so(context_run, context_data):
    assert json.loads((context_run / "config.json").read_text())["train"]["context"] == 16
    tagger = Tagger.load(context_run, precision="fp32")
    assert tagger.context == 16
    words = [json.loads(line)["tokens"] for line in (context_data / "test.json").read_text().splitlines()][:2]
    apart = tagger.word_logits(words)
    together = tagger.word_logits(words, contexts=tagger.contexts(words, ["d", "d"]))
    assert not torch.allclose(apart[0], together[0])  # the context changes what the model sees
    # raw text of two sentences = the same two sentences as one document of pre-split words
    text = " ".join(" ".join(w) for w in words)
    doc = tagger.tag_documents([text])[0]
    by_words = tagger.tag_words(words, docs=["d", "d"])
    assert doc.labels == by_words[0][0] + by_words[1][0]
    # CoNLL input with -DOCSTART-: predict reads its documents as evaluate does
    conll = "-DOCSTART- O\n\n" + "\n\n".join("\n".join(f"{w} O" for w in s) for s in words) + "\n"
    parsed = _conll_words(conll)
    assert parsed.docs == [1, 1]
    tagged = tag_pre_split(tagger, parsed, progress=False)
    assert [t.labels for t in tagged] == [by_words[0][0], by_words[1][0]]


def test_evaluate_scores_what_predict_predicts_and_shards_agree(context_run, context_data):
    from loratag.corpus import load as load_corpus

    tagger = Tagger.load(context_run, precision="fp32")
    corpus = load_corpus(str(context_data), None, 0)
    test = corpus.splits["test"]
    assert len({s.doc for s in test}) > 1 and all(s.doc is not None for s in test)
    result = evaluate(tagger, test)
    predicted = [labels for labels, _ in tagger.tag_words([s.tokens for s in test], docs=[s.doc for s in test])]
    from loratag.evaluation import scores

    assert scores([s.tags for s in test], predicted)["f1"] == result["f1"]

    class TwoShards:  # evaluate as two data-parallel processes would: every other sentence each
        world = 2

        def __init__(self):
            self.parts = []

        def gather(self, mine):
            return self.parts

    shards = []
    for rank in (0, 1):
        d = TwoShards()
        d.rank = rank
        d.parts = [None, None]

        def gather(mine, d=d):
            shards.append(mine)
            raise StopIteration

        d.gather = gather
        with pytest.raises(StopIteration):
            evaluate(tagger, test, dist=d)
    both = TwoShards()
    both.rank, both.parts = 0, shards
    assert evaluate(tagger, test, dist=both)["f1"] == result["f1"]


def test_context_must_not_be_negative():
    from loratag.config import TrainConfig

    with pytest.raises(ValueError, match="--context"):
        TrainConfig(context=-1)


def test_a_documents_passages_are_one_context_at_predict_as_in_training(context_run):
    """Training reads a document's sentences across its passages (title, abstract) as one context: so does
    predict, and so the character-level scores of evaluate."""
    from loratag.documents.model import Document, Passage
    from loratag.documents.tagging import tag_documents

    tagger = Tagger.load(context_run, precision="fp32")
    title, abstract = "IL-2 gene expression .", "NF-kappa B binds the IL-2 promoter ."
    doc = Document("d1", (Passage(0, title), Passage(len(title) + 1, abstract)))
    _, parts = tag_documents(tagger, [doc])[0]
    words = [title.split(), abstract.split()]
    together = tagger.tag_words(words, docs=["d1", "d1"])
    assert [p.labels for p in parts] == [together[0][0], together[1][0]]
    apart = tagger.word_logits(words)
    read = tagger.word_logits(words, contexts=tagger.contexts(words, ["d1", "d1"]))
    assert not torch.allclose(apart[1], read[1])  # the title is the abstract's context, and it matters


def test_context_without_documents_is_said_and_counted(tiny_bert, tmp_path, caplog):
    from .conftest import tagging_cfg

    cfg = tagging_cfg(tiny_bert)
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, context=8))
    with caplog.at_level("WARNING", logger="loratag"):
        run = train(cfg, tmp_path / "run", progress=False)
    assert "marks no documents" in caplog.text
    facts = json.loads((run / "config.json").read_text())["run"]["context"]
    assert facts == {"sentences_in_documents": 0, "subword_tokens_added_per_epoch": 0, "tokens_per_epoch_ratio": 1.0}


def test_context_is_counted_where_documents_are(context_run):
    facts = json.loads((context_run / "config.json").read_text())["run"]["context"]
    assert facts["sentences_in_documents"] == 8 and facts["subword_tokens_added_per_epoch"] > 0
    assert facts["tokens_per_epoch_ratio"] > 1


def test_pre_split_input_without_documents_says_it_is_read_sentence_by_sentence(context_run, caplog):
    tagger = Tagger.load(context_run, precision="fp32")
    parsed = _conll_words("IL-2 O\ngene O\n\nNF-kappa O\nB O\n")
    assert parsed.docs is None
    with caplog.at_level("WARNING", logger="loratag"):
        tag_pre_split(tagger, parsed, progress=False)
    assert "marks no documents" in caplog.text and "--context 16" in caplog.text
