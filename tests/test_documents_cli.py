"""Documents through the commands (issue 22): train from BioC/PubTator/brat files with --train/--test (a validation
split set aside and said), evaluate on character spans, predict into every format with the input's ids, passages and
infons kept, and the same path for shards."""

import json
from pathlib import Path

import pytest

from loratag.cli import main
from loratag.config import Config, CorpusSettings
from loratag.documents import Document, Passage, Span, open_writer, read_documents
from loratag.labels import LabelSet, tags_to_spans
from loratag.tagger import Tagger

from .conftest import RESOURCES, guide_lora, guide_train

TEXTS = ["IL-2 gene expression requires NF-kappa B.", "T cells express CD28. Human monocytes bind B7 (in vitro)."]


def tiny_documents(split: str, per_doc: int = 2) -> list[Document]:
    """The tiny corpus's sentences as documents: words joined by spaces, ``per_doc`` sentences each."""
    labels = LabelSet.from_mapping(json.loads((RESOURCES / "tiny/label.json").read_text()))
    rows = [json.loads(x) for x in (RESOURCES / f"tiny/{split}.json").read_text().splitlines()]
    docs = []
    for d in range(0, len(rows), per_doc):
        text, spans = "", []
        for row in rows[d : d + per_doc]:
            starts = []
            for w in row["tokens"]:
                text += " " if text else ""
                starts.append(len(text))
                text += w
            tags = [labels.labels[t] for t in row["tags"]]
            spans += [Span(starts[a], starts[b - 1] + len(row["tokens"][b - 1]), t) for a, b, t in tags_to_spans(tags)]
        docs.append(Document(f"{split}{d}", (Passage(0, text, {"type": "abstract"}),), tuple(spans), {"year": "2004"}))
    return docs


@pytest.fixture(scope="module")
def doc_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("docs")
    out = {}
    for split in ("train", "validation", "test"):
        out[split] = d / f"{split}.bioc.xml"
        with open_writer(out[split], "bioc-xml") as w:
            for doc in tiny_documents(split):
                w.write(doc)
    return out


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory, tiny_bert, doc_files) -> Path:
    """Trained from BioC with --train and --test only: validation is set aside from the training documents."""
    from loratag.train import train

    cfg = Config(
        model=str(tiny_bert),
        lora=guide_lora(r=4, alpha=8, bias="all"),
        train=guide_train(lr=0.05, batch_size=4, epochs=1, checkpoint_minutes=0),
        corpus=CorpusSettings(train=str(doc_files["train"]), test=str(doc_files["test"]), validation_fraction=0.25),
    )
    return train(cfg, tmp_path_factory.mktemp("runs") / "run", progress=False)


def test_training_from_documents_sets_validation_aside_and_says_so(doc_run):
    config = json.loads((doc_run / "config.json").read_text())
    data = config["run"]["data"]
    assert data["validation"] == {
        "set_aside_from": "train",
        "fraction": 0.25,
        "seed": 42,
        "documents": 1,
        "sentences": 2,
    }
    assert data["train"]["format"] == "bioc-xml" and data["train"]["documents"] == 3
    assert config["corpus"]["train"].endswith("train.bioc.xml") and Config.load(doc_run / "config.json").corpus.test
    assert "set aside for validation" in (doc_run / "train.log").read_text()
    test = json.loads((doc_run / "metrics.json").read_text())["test"]
    assert set(test["characters"]) >= {"exact", "boundary", "documents"} and test["characters"]["documents"] == 3
    assert 0 <= test["characters"]["exact"]["f1"] <= test["characters"]["boundary"]["f1"] <= 1
    assert "untyped" in test and test["untyped"]["f1"] >= test["f1"]


def test_the_carved_validation_split_is_whole_documents_and_seeded(doc_files):
    from loratag.corpus import load

    settings = CorpusSettings(train=str(doc_files["train"]), validation_fraction=0.25)
    a, b = load("", settings, seed=1), load("", settings, seed=1)
    assert [s.tokens for s in a.splits["validation"]] == [s.tokens for s in b.splits["validation"]]
    held = {s.doc for s in a.splits["validation"]}
    assert len(held) == 1 and len(a.splits["validation"]) == 2  # one document of four, both its sentences
    assert not held & {s.doc for s in a.splits["train"]} and len(a.splits["train"]) + len(a.splits["validation"]) == 8
    by_seed = {frozenset(s.doc for s in load("", settings, seed=k).splits["validation"]) for k in range(8)}
    assert len(by_seed) > 1  # the seed chooses which


def test_evaluate_scores_a_document_file_on_character_spans(doc_run, doc_files, capsys):
    assert main(["evaluate", str(doc_run), "--test", str(doc_files["test"]), "--output", "/dev/null"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = json.loads((doc_run / "metrics.json").read_text())["test"]
    assert result["f1"] == metrics["f1"] and result["characters"]["exact"] == metrics["characters"]["exact"]
    assert main(["evaluate", str(doc_run), "--output", "/dev/null"]) == 0  # the run's own test file
    assert json.loads(capsys.readouterr().out)["characters"]["exact"] == metrics["characters"]["exact"]


def test_document_scores_are_the_scores_of_what_predict_writes(doc_run, doc_files, tmp_path):
    """Character-level F1 recomputed from predict's BioC output equals evaluate's: one prediction path."""
    from loratag.evaluation import span_scores

    out = tmp_path / "pred.bioc.xml"
    assert main(["predict", str(doc_run), "--input", str(doc_files["test"]), "--output", str(out)]) == 0
    pred = [d.mentions() for d in read_documents(out)]
    gold = [d.mentions() for d in read_documents(doc_files["test"])]
    metrics = json.loads((doc_run / "metrics.json").read_text())["test"]["characters"]["exact"]
    assert span_scores(gold, pred)["f1"] == pytest.approx(metrics["f1"])


OUTPUTS = [
    ("bioc-xml", "o.bioc.xml"),
    ("bioc-json", "o.bioc.json"),
    ("pubtator", "o.pubtator"),
    ("labelstudio", "o.labelstudio.json"),
    ("jsonl", "o.jsonl.gz"),
    ("prodigy", "o.prodigy.jsonl"),
]


@pytest.mark.parametrize("fmt, name", OUTPUTS)
def test_predict_writes_each_format_with_the_input_kept(doc_run, doc_files, tmp_path, fmt, name):
    out = tmp_path / name
    assert main(["predict", str(doc_run), "--input", str(doc_files["test"]), "--output", str(out)]) == 0
    inputs = list(read_documents(doc_files["test"]))
    got = list(read_documents(out))
    tagged = Tagger.load(doc_run).tag_documents([d.text for d in inputs])
    expected = [[(e.start, e.end, e.label) for e in t.entities] for t in tagged]
    assert [d.text for d in got] == [d.text for d in inputs]
    assert [d.mentions() for d in got] == [sorted(e) for e in expected]
    assert [d.id for d in got] == [d.id for d in inputs]
    if fmt == "bioc-xml":
        assert [d.infons for d in got] == [{"year": "2004"}] * len(inputs)
        assert [d.passages for d in got] == [d.passages for d in inputs]
        assert all(s.infons.get("annotator") == "loratag" and s.infons["run"] == "run" for d in got for s in d.spans)


def test_keep_annotations_keeps_the_inputs_beside_ours(doc_run, doc_files, tmp_path):
    out = tmp_path / "kept.bioc.xml"
    argv = ["predict", str(doc_run), "--input", str(doc_files["test"]), "--output", str(out), "--keep-annotations"]
    assert main(argv) == 0
    for given, got in zip(read_documents(doc_files["test"]), read_documents(out)):
        theirs = [s for s in got.spans if s.infons.get("annotator") != "loratag"]
        assert sorted((s.start, s.end, s.type) for s in theirs) == given.mentions()


def test_predict_brat_folder_and_spacy(doc_run, doc_files, tmp_path):
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import DocBin

    folder = tmp_path / "brat"
    argv = ["predict", str(doc_run), "--input", str(doc_files["test"]), "--output", str(folder), "--format", "brat"]
    assert main(argv) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"test{i}.{x}" for i in (0, 2, 4) for x in ("ann", "txt")]
    ann = (folder / "test0.ann").read_text()
    assert ann.count("AnnotatorNotes") == ann.count("\nT") + ann.startswith("T")
    out = tmp_path / "o.spacy"
    assert main(["predict", str(doc_run), "--input", str(doc_files["test"]), "--output", str(out)]) == 0
    docs = list(DocBin().from_disk(out).get_docs(spacy.blank("en").vocab))
    brat = list(read_documents(folder))
    assert [sorted((e.start_char, e.end_char, e.label_) for e in d.ents) for d in docs] == [d.mentions() for d in brat]


def test_sharded_prediction_takes_document_formats(doc_run, doc_files, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    for split in ("validation", "test"):
        (shards / f"{split}.bioc.xml").write_bytes(doc_files[split].read_bytes())
    out = tmp_path / "out"
    argv = ["predict", str(doc_run), "--input", str(shards), "--output", str(out), "--format", "pubtator"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "test.pubtator", "validation.pubtator"]
    single = tmp_path / "single.pubtator"
    assert main(["predict", str(doc_run), "--input", str(doc_files["test"]), "--output", str(single)]) == 0
    assert (out / "test.pubtator").read_bytes() == single.read_bytes()


def test_train_types_and_type_map_flags(tmp_path, tiny_bert, doc_files):
    """--type-map merges, --types keeps: the run's labels say what was trained, config.json the counts."""
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(tiny_bert),
        "--train",
        str(doc_files["train"]),
        "--validation",
        str(doc_files["validation"]),
        "--type-map",
        "cell_type=cell",
        "--types",
        "cell,protein",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert json.loads((out / "labels.json").read_text()) == {
        "O": 0,
        "B-cell": 1,
        "I-cell": 2,
        "B-protein": 3,
        "I-protein": 4,
    }
    repairs = json.loads((out / "config.json").read_text())["run"]["data"]["train"]["repairs"]
    assert repairs["type cell_type read as cell (--type-map)"] > 0 and repairs["type DNA left out (--types)"] > 0


def test_bad_document_input_exits_2_with_one_line(tmp_path, tiny_bert, capsys):
    bad = tmp_path / "train.pubtator"
    bad.write_text("1|t|IL-2 binds\n1\t0\t4\tIL-3\tprotein\t-\n")
    assert main(["train", "--model", str(tiny_bert), "--train", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.pubtator: document 1 (line 1): mention T1 protein at 0-4: the mention text is 'IL-3'" in err
    assert err.count("\n") == 0
