import pytest

from loratag.labels import LabelSet, repair_iob2, tags_to_spans


def test_from_mapping_orders_by_id():
    labels = LabelSet.from_mapping({"O": 0, "B-DNA": 1, "I-DNA": 2})
    assert labels.labels == ("O", "B-DNA", "I-DNA")
    assert labels.id2label == {0: "O", 1: "B-DNA", 2: "I-DNA"}
    with pytest.raises(ValueError, match="without gaps"):
        LabelSet.from_mapping({"O": 0, "B-DNA": 2})


def test_from_tags_sorted_with_o_first():
    assert LabelSet.from_tags(["I-RNA", "O", "B-DNA"]).labels == ("O", "B-DNA", "I-DNA", "B-RNA", "I-RNA")


def test_rejects_non_iob2():
    with pytest.raises(ValueError, match="not IOB2"):
        LabelSet(("O", "PER"))


def test_repair_does_not_mutate():
    tags = ["I-DNA", "I-RNA", "B-RNA", "I-RNA", "O", "I-RNA"]
    fixed, n = repair_iob2(tags)
    assert fixed == ["B-DNA", "B-RNA", "B-RNA", "I-RNA", "O", "B-RNA"] and n == 3
    assert tags[0] == "I-DNA"


def test_spans():
    assert tags_to_spans(["B-DNA", "B-DNA", "I-DNA", "I-RNA", "O"]) == [(0, 1, "DNA"), (1, 3, "DNA"), (3, 4, "RNA")]
    assert tags_to_spans([]) == []


def test_viterbi_keeps_iob2_valid_where_argmax_would_not():
    import torch

    from loratag.labels import viterbi

    names = ["O", "B-DNA", "I-DNA", "B-RNA", "I-RNA"]
    p = torch.tensor(
        [
            [0.60, 0.35, 0.05, 0.0, 0.0],  # O
            [0.05, 0.05, 0.90, 0.0, 0.0],  # argmax I-DNA after O: not valid
            [0.05, 0.00, 0.35, 0.0, 0.60],  # argmax I-RNA after a DNA entity: not valid
        ]
    )
    assert [names[i] for i in p.argmax(-1)] == ["O", "I-DNA", "I-RNA"]
    assert [names[i] for i in viterbi(p.log(), names)] == ["B-DNA", "I-DNA", "I-DNA"]


@pytest.mark.parametrize("seed", range(40))
def test_viterbi_is_the_best_valid_sequence_by_brute_force(seed):
    import itertools

    import torch

    from loratag.labels import may_follow, viterbi

    names = ["O", "B-DNA", "I-DNA", "B-RNA", "I-RNA"]
    g = torch.Generator().manual_seed(seed)
    n = 1 + seed % 5
    logp = torch.randn(n, len(names), generator=g).log_softmax(-1)
    allowed, start = may_follow(names)

    def valid(seq):
        return start[seq[0]] and all(allowed[a][b] for a, b in zip(seq, seq[1:]))

    best = max(
        (s for s in itertools.product(range(len(names)), repeat=n) if valid(s)),
        key=lambda s: sum(float(logp[t, j]) for t, j in enumerate(s)),
    )
    got = viterbi(logp, names)
    assert valid(got)
    assert sum(float(logp[t, j]) for t, j in enumerate(got)) == pytest.approx(
        sum(float(logp[t, j]) for t, j in enumerate(best)), abs=1e-5
    )


def test_viterbi_many_gives_each_sentence_the_path_viterbi_gives_it():
    """Sentences of every length (one word to long, and empty) decoded together in chunks: every path equals the
    one-sentence decoder's, including where padding past a short sentence's end would change it if it leaked."""
    import torch

    from loratag.labels import viterbi, viterbi_many

    names = ["O", "B-DNA", "I-DNA", "B-RNA", "I-RNA", "B-cell_type", "I-cell_type"]
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 2, 3, 0, 40, 7, 1, 19, 64, 5] * 7
    sentences = [torch.randn(n, len(names), generator=gen).mul(3).log_softmax(-1) for n in lengths]
    many = viterbi_many([s.numpy() for s in sentences], names, chunk=8)
    assert many == [viterbi(s, names) if len(s) else [] for s in sentences]
    assert all(len(p) == n for p, n in zip(many, lengths))


@pytest.mark.parametrize("seed", range(5))
def test_scores_are_seqevals_scores(seed):
    """evaluation.scores counts seqeval's entities once; precision, recall, F1 and every per-type row must be what
    seqeval's own report and f1_score give, on sequences with stray I- tags, type switches and empty sentences."""
    import random

    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    from loratag.evaluation import mentions, scores

    rng = random.Random(seed)
    tags = ["O", "O", "O", "B-DNA", "I-DNA", "B-protein", "I-protein", "I-RNA", "B-cell_type"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(0, 12))] for _ in range(200)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in s] for s in gold]
    got = scores(gold, pred)
    assert got["precision"] == pytest.approx(precision_score(gold, pred, zero_division=0), abs=1e-12)
    assert got["recall"] == pytest.approx(recall_score(gold, pred, zero_division=0), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0), abs=1e-12)
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    rows = {k: v for k, v in report.items() if not k.endswith(" avg")}
    assert set(got["per_type"]) == set(rows) == {"DNA", "protein", "RNA", "cell_type"}
    for k, v in rows.items():
        mine = got["per_type"][k]
        assert (mine["precision"], mine["recall"], mine["f1"]) == pytest.approx(
            (v["precision"], v["recall"], v["f1-score"]), abs=1e-12
        )
        assert mine["support"] == v["support"]
    assert scores(gold, pred, mentions(gold)) == got  # gold entities counted once for several predictions
    # untyped scores from the same entities equal those of loratag's own chunker (predict's entities)
    from loratag.evaluation import _untyped, span_scores
    from loratag.labels import tags_to_spans

    untyped = span_scores(_untyped(map(tags_to_spans, gold)), _untyped(map(tags_to_spans, pred)))
    assert got["untyped"] == {k: untyped[k] for k in ("precision", "recall", "f1")}
