import json
import logging

import pytest

from loratag.data import DataError, from_hf_dataset, load_corpus, load_folder

from .conftest import RESOURCES


def write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


def conll_folder(tmp_path, train_text):
    good = "A\tO\nB\tB-DNA\n\n"
    write(tmp_path, "train.conll", train_text)
    write(tmp_path, "dev.conll", good)
    write(tmp_path, "test.conll", good)
    return tmp_path


def test_tner_folder():
    corpus = load_folder(RESOURCES / "tiny")
    assert set(corpus.splits) == {"train", "validation", "test"}
    assert corpus.labels.labels[:3] == ("O", "B-DNA", "I-DNA")
    s = corpus.splits["train"][0]
    assert s.tokens[:2] == ("IL-2", "gene") and s.tags[:2] == ("B-DNA", "I-DNA")


def test_conll_folder_matches_tner():
    a, b = load_folder(RESOURCES / "tiny"), load_folder(RESOURCES / "tiny-conll")
    assert a.splits == b.splits
    assert set(b.labels.labels) == set(a.labels.labels)  # derived from the tags seen: sorted, O first
    assert b.labels.labels[0] == "O"


def test_wrong_column_count(tmp_path):
    conll_folder(tmp_path, "A\tNN\tO\nB\tB-DNA\n")
    with pytest.raises(DataError, match=r"train.conll:2: expected 3 columns"):
        load_folder(tmp_path)


def test_tag_not_in_label_set(tmp_path):
    write(tmp_path, "label.json", json.dumps({"O": 0, "B-DNA": 1, "I-DNA": 2}))
    write(tmp_path, "train.json", json.dumps({"tokens": ["a"], "tags": ["B-RNA"]}) + "\n")
    write(tmp_path, "validation.json", json.dumps({"tokens": ["a"], "tags": [0]}) + "\n")
    with pytest.raises(
        DataError, match=r"train.json:1: tag 'B-RNA' is not in the label set; expected one of O, B-DNA"
    ):
        load_folder(tmp_path)


def test_tag_id_out_of_range(tmp_path):
    write(tmp_path, "label.json", json.dumps({"O": 0, "B-DNA": 1, "I-DNA": 2}))
    write(tmp_path, "train.json", '{"tokens": ["a"], "tags": [0]}\n{"tokens": ["a"], "tags": [7]}\n')
    write(tmp_path, "validation.json", '{"tokens": ["a"], "tags": [0]}\n')
    with pytest.raises(DataError, match=r"train.json:2: tag id 7 out of range"):
        load_folder(tmp_path)


def test_length_mismatch(tmp_path):
    write(tmp_path, "train.json", '\n{"tokens": ["a", "b"], "tags": ["O"]}\n')
    write(tmp_path, "validation.json", '{"tokens": ["a"], "tags": ["O"]}\n')
    with pytest.raises(DataError, match=r"train.json:2: 2 tokens but 1 tags"):
        load_folder(tmp_path)


def test_bad_json_line(tmp_path):
    write(tmp_path, "train.json", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [\n')
    write(tmp_path, "validation.json", '{"tokens": ["a"], "tags": ["O"]}\n')
    with pytest.raises(DataError, match=r"train.json:2: not valid JSON"):
        load_folder(tmp_path)


def test_empty_split(tmp_path):
    conll_folder(tmp_path, "A\tO\n")
    write(tmp_path, "dev.conll", "-DOCSTART- O\n\n\n")
    with pytest.raises(DataError, match=r"dev.conll: the validation split is empty"):
        load_folder(tmp_path)


def test_not_utf8(tmp_path):
    conll_folder(tmp_path, "")
    (tmp_path / "train.conll").write_bytes("A\tO\nB\xe9ta\tB-DNA\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train.conll:2: not UTF-8"):
        load_folder(tmp_path)


def test_missing_directory_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        load_corpus(str(tmp_path / "nope"))
    write(tmp_path, "train.conll", "A\tO\n")
    with pytest.raises(FileNotFoundError, match="no validation file; expected validation/valid/dev/devel"):
        load_folder(tmp_path)


def test_stray_inside_tag_is_repaired_with_a_warning(tmp_path, caplog):
    conll_folder(tmp_path, "A\tO\nB\tI-DNA\nC\tI-DNA\nD\tI-RNA\n\n")
    with caplog.at_level(logging.WARNING, logger="loratag"):
        corpus = load_folder(tmp_path)
    assert corpus.splits["train"][0].tags == ("O", "B-DNA", "I-DNA", "B-RNA")
    assert "repaired 2 I- tags" in caplog.text and "train.conll" in caplog.text


def test_hub_name_reads_a_tner_style_snapshot(tmp_path):
    """tner/bionlp2004 on the Hub: a loading script beside dataset/{train,valid,test,label}.json."""
    repo = tmp_path / "repo"
    write(repo, "bionlp2004.py", "# loading script: current datasets no longer runs these\n")
    for src, dst in (("train", "train"), ("validation", "valid"), ("test", "test"), ("label", "label")):
        write(repo / "dataset", f"{dst}.json", (RESOURCES / "tiny" / f"{src}.json").read_text())
    asked = []
    corpus = load_corpus("tner/bionlp2004", download=lambda name: asked.append(name) or repo)
    assert asked == ["tner/bionlp2004"]
    assert corpus.splits == load_folder(RESOURCES / "tiny").splits
    assert corpus.labels == load_folder(RESOURCES / "tiny").labels


def test_hub_failure_is_one_clear_line():
    def offline(name):
        raise OSError("network is unreachable")

    with pytest.raises(FileNotFoundError, match="could not fetch dataset 'tner/bionlp2004'.*local folder"):
        load_corpus("tner/bionlp2004", download=offline)


def test_hf_dataset_with_class_labels():
    import datasets

    feats = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-DNA", "I-DNA"])),
        }
    )
    rows = {"tokens": [["a", "b"]], "ner_tags": [[1, 2]]}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=feats) for s in ("train", "validation")})
    corpus = from_hf_dataset(dd, "x/y")
    assert corpus.labels.labels == ("O", "B-DNA", "I-DNA")
    assert corpus.splits["validation"][0].tags == ("B-DNA", "I-DNA")
