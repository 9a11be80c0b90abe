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
