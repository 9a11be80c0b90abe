"""Documents in and out (issue 22): every format read from small files written from its specification, round trips,
errors that name the file and the line or document, the repairs that make flat IOB2, and the libraries' own
readers (spaCy, Label Studio) on what we write."""

import json
from collections import Counter
from pathlib import Path

import pytest

from loratag.data import DataError
from loratag.documents import Document, Passage, Span, detect, open_writer, output_format, read_documents
from loratag.documents.align import SpanPolicy, flatten, select, split_of, to_sentences

DOCS = Path(__file__).parent / "resources" / "documents"
SAMPLES = {
    "sample.bioc.xml": "bioc-xml",
    "sample.bioc.json": "bioc-json",
    "sample.pubtator": "pubtator",
    "brat": "brat",
    "labelstudio.json": "labelstudio",
    "prodigy.jsonl": "jsonl",
    "doccano.jsonl": "jsonl",
}
WRITERS = {
    "bioc-xml": "out.bioc.xml",
    "bioc-json": "out.bioc.json",
    "pubtator": "out.pubtator",
    "brat": "out-brat",
    "labelstudio": "out.labelstudio.json",
    "jsonl": "out.jsonl",
    "prodigy": "out.prodigy.jsonl",
    "spacy": "out.spacy",
}


def key(docs):
    return [(d.id, d.text, d.mentions()) for d in docs]


@pytest.mark.parametrize("name", SAMPLES)
def test_each_format_is_detected_from_name_and_content(name):
    assert detect(DOCS / name) == SAMPLES[name]


def test_pubtator_in_a_txt_file_is_detected_by_its_content(tmp_path):
    p = tmp_path / "NCBItrainset_corpus.txt"
    p.write_bytes((DOCS / "sample.pubtator").read_bytes())
    assert detect(p) == "pubtator"
    assert key(read_documents(p)) == key(read_documents(DOCS / "sample.pubtator"))


def test_what_each_reader_finds():
    """The same abstract in every format: the same text, and mentions at the same offsets."""
    pubtator = list(read_documents(DOCS / "sample.pubtator"))
    doc = pubtator[0]
    assert doc.id == "1000" and [p.offset for p in doc.passages] == [0, len(doc.passages[0].text) + 1]
    assert doc.text[25:35] == "NF-kappa B" and (25, 35, "protein") in doc.mentions()
    assert doc.spans[0].infons == {"identifier": "D000"}
    assert doc.source == ["1000\tAssociation\tD001\tD002"]  # the relation line, kept aside
    bioc = list(read_documents(DOCS / "sample.bioc.xml"))
    assert bioc[0].infons == {"journal": "J Immunol"} and bioc[0].passages[0].infons == {"type": "title"}
    disc = [s for s in bioc[0].spans if s.fragments]
    assert len(disc) == 1 and doc.text[disc[0].fragments[0][0] : disc[0].fragments[0][1]] == "B"
    assert set(bioc[0].mentions()) - set(doc.mentions()) == {(disc[0].start, disc[0].end, "cell_type")}
    brat = list(read_documents(DOCS / "brat"))[0]
    assert brat.text == doc.text + "\n" and brat.source[0].startswith("R1\t")
    for name in ("sample.bioc.json", "labelstudio.json", "prodigy.jsonl", "doccano.jsonl"):
        got = list(read_documents(DOCS / name))[0]
        assert got.text == doc.text and got.mentions() == doc.mentions(), name


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("fmt", WRITERS)
def test_read_write_read_keeps_ids_text_and_spans(tmp_path, name, fmt):
    docs = list(read_documents(DOCS / name))
    if fmt == "spacy":
        pytest.importorskip("spacy")
        docs = [d for d in docs if not _overlapping(d)]  # doc.ents cannot overlap
    out = tmp_path / WRITERS[fmt]
    with open_writer(out, fmt) as w:
        for d in docs:
            w.write(d)
    expected = key(docs)
    if fmt == "pubtator":  # PubTator holds a text on one line: a line break is written as a space (offsets stay)
        expected = [(i, t.replace("\n", " "), m) for i, t, m in expected]
    assert key(read_documents(out)) == expected


@pytest.mark.parametrize("fmt", ["bioc-xml", "bioc-json", "pubtator", "jsonl"])
def test_gzip_round_trip(tmp_path, fmt):
    docs = list(read_documents(DOCS / "sample.pubtator"))
    out = tmp_path / (WRITERS[fmt] + ".gz")
    with open_writer(out, fmt) as w:
        for d in docs:
            w.write(d)
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert key(read_documents(out)) == key(docs)


def test_the_same_format_gives_back_what_it_read(tmp_path):
    """BioC and PubTator written as read: ids, passages with their offsets and infons, document infons; with keep,
    the relations too."""
    for name, fmt in (("sample.bioc.xml", "bioc-xml"), ("sample.pubtator", "pubtator")):
        docs = list(read_documents(DOCS / name))
        out = tmp_path / WRITERS[fmt]
        with open_writer(out, fmt, keep=True) as w:
            for d in docs:
                w.write(d)
        back = list(read_documents(out))
        assert back == docs  # ids, passages (offsets, texts, infons), spans, document infons
    assert "Association\tD001\tD002" in (tmp_path / "out.pubtator").read_text()
    assert '<relation id="R1">' in (tmp_path / "out.bioc.xml").read_text()


def _overlapping(doc):
    spans = sorted(doc.spans, key=lambda s: (s.start, s.end))
    return any(a.end > b.start for a, b in zip(spans, spans[1:]))


# ---- bad input: one line naming the file and the line or document ----------------------------------------------

BAD = [
    ("x.pubtator", "1|t|Title here\n1|a|Abstract.\n1\t0\tfive\tTitle\tX\tC1\n", "x.pubtator:3: expected PMID"),
    ("x.pubtator", "1|t|Title here\n2\t0\t5\tTitle\tX\n", "x.pubtator:2: a line for '2' where document 1"),
    ("x.pubtator", "1|t|Title here\n1\t0\t5\tTitlE\tX\tC\n", "document 1 (line 1): mention T1 X at 0-5: the mention"),
    ("x.pubtator", "1|t|Title here\n1\t5\t3\tx\tX\tC\n", "mention T1 X at 5-3: span 5-3 is empty or reversed"),
    ("x.pubtator", "1|t|Title\n1\t2\t40\tx\tX\tC\n", "span 2-40 is outside the text (0-5)"),
    (
        "x.bioc.xml",
        "<collection><document><id>9</id><passage><offset>0</offset><text>abc</text>"
        '<annotation id="a"><location offset="0" length="2"/><text>ab</text></annotation></passage></document>'
        "</collection>",
        "x.bioc.xml: document 9: annotation 'a' has no 'type' infon",
    ),
    ("x.bioc.xml", "<collection><document><id>9</id><passage>\n<offset>0</offset>\n<text>a</passage>", "x.bioc.xml:3"),
    (
        "x.bioc.json",
        '{"documents": [{"id": "9", "passages": [{"offset": 0, "text": "abc", "annotations": '
        '[{"id": "a", "infons": {"type": "X"}, "text": "abd", "locations": [{"offset": 0, "length": 3}]}]}]}]}',
        "document 9: mention a X at 0-3: the mention text is 'abd'",
    ),
    (
        "x.jsonl",
        '{"text": "abc", "spans": [{"start": 0, "end": 2, "label": "X"}]}\n{"text": "abc", "spans": [[0]]}\n',
        "x.jsonl:2: span [0]: expected",
    ),
    ("x.labelstudio.json", '{"not": "tasks"}', 'x.labelstudio.json: task 0: expected a task with "data"'),
]


@pytest.mark.parametrize("name, content, message", BAD)
def test_bad_files_fail_with_one_line_naming_file_and_place(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError) as e:
        list(read_documents(p))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_brat_line_names_its_file_and_line(tmp_path):
    (tmp_path / "d.txt").write_text("IL-2 binds")
    (tmp_path / "d.ann").write_text("T1\tProtein 0 4\tIL-2\nT2\tProtein zero 4\tIL-2\n")
    with pytest.raises(DataError, match=r"d\.ann:2: expected T<N><TAB>Type start end"):
        list(read_documents(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "e.ann").write_text("T1\tProtein 0 4\tIL-2\n")
    with pytest.raises(DataError, match=r"e\.ann: no e\.txt beside it"):
        list(read_documents(other))


def test_output_format_by_name_or_flag():
    assert output_format(Path("a.bioc.xml.gz")) == "bioc-xml"
    assert output_format(Path("NCBI.pubtator")) == "pubtator"
    assert output_format(Path("x.labelstudio.json")) == "labelstudio"
    assert output_format(Path("x.json")) == "jsonl"
    assert output_format(Path("folder"), "brat") == "brat"
    with pytest.raises(ValueError, match="unknown format '.csv'"):
        output_format(Path("x.csv"))


# ---- documents -> IOB2: what does not fit is repaired and counted --------------------------------------------------


def doc_of(text, *mentions, **kw):
    spans = []
    for m, t, *n in mentions:
        i = -1
        for _ in range(n[0] if n else 1):
            i = text.index(m, i + 1)
        spans.append(Span(i, i + len(m), t))
    return Document.plain("d", text, spans, **kw)


def tagged(doc, policy=SpanPolicy()):
    repairs = Counter()
    got = split_of([doc], policy, repairs)
    return [list(zip(s.tokens, s.tags)) for s in got.sentences], repairs


def test_a_mention_inside_a_word_splits_the_word():
    sents, repairs = tagged(doc_of("IL-2Ralpha binds.", ("IL-2", "protein")))
    assert sents == [[("IL-2", "B-protein"), ("Ralpha", "O"), ("binds", "O"), (".", "O")]]
    assert repairs == {"words split where a mention begins or ends inside them": 1}


def test_overlaps_keep_the_longest_or_the_first():
    d = doc_of("CD28 surface receptor binds", ("CD28", "protein"), ("CD28 surface receptor", "protein"))
    longest, repairs = tagged(d)
    assert [t for _, t in longest[0]] == ["B-protein", "I-protein", "I-protein", "O"]
    assert repairs == {"overlapping mentions left out (--overlaps longest)": 1}
    first, repairs = tagged(d, SpanPolicy(overlaps="first"))
    assert [t for _, t in first[0]] == ["B-protein", "I-protein", "I-protein", "O"]  # same start: the longer first
    d2 = doc_of("NF-kappa B p50 binds", ("NF-kappa B", "protein"), ("B p50", "protein"))
    first, _ = tagged(d2, SpanPolicy(overlaps="first"))
    assert [t for _, t in first[0]] == ["B-protein", "I-protein", "O", "O"]


def test_discontinuous_mentions_keep_first_fragment_or_extent():
    text = "B- and T-cells"
    d = Document.plain("d", text, [Span(0, 14, "cell_type", fragments=((0, 1), (9, 14)))])
    first, repairs = tagged(d)
    assert first == [[("B", "B-cell_type"), ("-", "O"), ("and", "O"), ("T-cells", "O")]]
    assert repairs["discontinuous mentions: first fragment kept"] == 1
    extent, repairs = tagged(d, SpanPolicy(discontinuous="extent"))
    assert extent == [[("B-", "B-cell_type"), ("and", "I-cell_type"), ("T-cells", "I-cell_type")]]
    assert repairs["discontinuous mentions: whole extent kept"] == 1


def test_a_mention_across_a_sentence_end_joins_the_sentences():
    sents, repairs = tagged(doc_of("Cells grow. IL-2 binds in vitro. Then.", ("vitro. Then", "X")))
    assert sents[1][3:6] == [("vitro", "B-X"), (".", "I-X"), ("Then", "I-X")]
    assert repairs["sentences joined where a mention ran across their end"] == 1
    assert [len(s) for s in sents] == [3, 7]


def test_types_and_type_map():
    d = doc_of(
        "SpecificDisease and DiseaseClass and Chem",
        ("SpecificDisease", "SpecificDisease"),
        ("DiseaseClass", "DiseaseClass"),
        ("Chem", "Chemical"),
    )
    policy = SpanPolicy(types=("Disease",), type_map={"SpecificDisease": "Disease", "DiseaseClass": "Disease"})
    sents, repairs = tagged(d, policy)
    assert [t for _, t in sents[0]] == ["B-Disease", "O", "B-Disease", "O", "O"]
    assert repairs == {
        "type SpecificDisease read as Disease (--type-map)": 1,
        "type DiseaseClass read as Disease (--type-map)": 1,
        "type Chemical left out (--types)": 1,
    }


def test_sentences_know_their_document_and_offsets():
    d = Document(
        "p1",
        (Passage(0, "IL-2 binds.", {}), Passage(12, "T cells grow.", {})),
        (Span(0, 4, "protein"), Span(12, 19, "cell_type")),
    )
    repairs = Counter()
    sents = to_sentences(d, flatten(select(d, SpanPolicy(), repairs), SpanPolicy(), repairs), repairs)
    assert [s.doc for s in sents] == ["p1", "p1"]
    assert sents[1].offsets[:2] == ((12, 13), (14, 19)) and sents[1].tags[:2] == ("B-cell_type", "I-cell_type")


def test_a_mention_across_passages_is_an_error():
    d = Document("p1", (Passage(0, "IL-2", {}), Passage(5, "binds", {})), (Span(0, 10, "protein"),), where="f: doc p1")
    with pytest.raises(DataError, match="runs across two passages"):
        split_of([d], SpanPolicy(), Counter())


def test_overlapping_passages_are_an_error():
    with pytest.raises(DataError, match="overlaps the one before"):
        Document("x", (Passage(0, "abcdef"), Passage(3, "def")))


# ---- the libraries' own readers on what we write -----------------------------------------------------------------


def test_spacy_reads_our_docbin(tmp_path):
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import DocBin

    docs = [d for d in read_documents(DOCS / "sample.pubtator") if not _overlapping(d)]
    docs = [Document("1000", docs[0].passages, tuple(flatten(list(docs[0].spans), SpanPolicy(), Counter())))]
    with open_writer(tmp_path / "x.spacy", "spacy") as w:
        for d in docs:
            w.write(d)
    nlp = spacy.blank("en")
    got = list(DocBin().from_disk(tmp_path / "x.spacy").get_docs(nlp.vocab))
    assert got[0].text == docs[0].text and got[0].user_data["id"] == "1000"
    assert sorted((e.start_char, e.end_char, e.label_) for e in got[0].ents) == docs[0].mentions()


def test_label_studio_accepts_our_predictions(tmp_path):
    pytest.importorskip("label_studio_sdk")
    from label_studio_sdk.label_interface import LabelInterface

    doc = next(iter(read_documents(DOCS / "sample.pubtator")))
    ours = Document.plain("1000", doc.text, [Span(s.start, s.end, s.type, score=0.9, ours=True) for s in doc.spans])
    with open_writer(tmp_path / "p.labelstudio.json", "labelstudio", run="runs/x") as w:
        w.write(ours)
    tasks = json.loads((tmp_path / "p.labelstudio.json").read_text())
    config = (
        '<View><Labels name="label" toName="text">'
        + "".join(f'<Label value="{t}"/>' for t in sorted({s.type for s in doc.spans}))
        + '</Labels><Text name="text" value="$text"/></View>'
    )
    from label_studio_sdk.label_interface.objects import PredictionValue

    li = LabelInterface(config)
    prediction = tasks[0]["predictions"][0]
    assert tasks[0]["data"][next(iter(li.objects)).value_name] == doc.text
    assert li.validate_prediction(prediction, return_errors=True) == []
    PredictionValue(**prediction)  # the SDK's own model of a prediction (pydantic) takes it as is
    assert len(prediction["result"]) == len(doc.spans) and prediction["model_version"] == "loratag runs/x"
    wrong = {
        **prediction,
        "result": [{**prediction["result"][0], "value": {**prediction["result"][0]["value"], "labels": ["Nothing"]}}],
    }
    assert li.validate_prediction(wrong, return_errors=True)  # the check is not vacuous


def test_label_studio_tasks_with_several_annotations_are_counted(tmp_path, caplog):
    tasks = json.loads((DOCS / "labelstudio.json").read_text())
    first = tasks[0]["annotations"][0]["result"]
    tasks[0]["annotations"] = [{"result": [], "was_cancelled": True}, {"result": first}, {"result": first[:1]}]
    (tmp_path / "x.json").write_text(json.dumps(tasks))
    docs = list(read_documents(tmp_path / "x.json"))
    assert len(docs[0].spans) == len(first)  # the first annotation not cancelled
    assert "1 tasks have several annotations; the first one not cancelled of each is read" in caplog.text


def test_sentence_files_may_be_gzipped_too(tmp_path):
    """tner JSON Lines and CoNLL read through the same gzip-aware lines as documents."""
    import gzip
    import shutil

    from loratag.corpus import load

    tiny = DOCS.parent / "tiny"
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.json.gz").write_bytes(gzip.compress((tiny / f"{split}.json").read_bytes()))
    shutil.copy(tiny / "label.json", tmp_path / "label.json")
    plain, zipped = load(str(tiny)), load(str(tmp_path))
    assert zipped.splits == plain.splits and zipped.labels == plain.labels
    assert zipped.report["train"]["format"] == "tner"
