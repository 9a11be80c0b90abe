"""BioNLP2004 as documents: each abstract of ``documents.tsv`` detokenized into text with character offsets (no
space before ``. , ; : ) ] %`` and clitics, none after ``( [``; sentences joined by one space; the first sentence,
GENIA's title, as the title passage), its entities as character spans, written in BioC XML, PubTator and brat by
loratag's own writers. Third-party data: written outside the repository.

    python benchmarks/bionlp_documents.py --data ../shared/data/bionlp2004 --out /tmp/bionlp-docs

Prints, per format and split, the documents and mentions written and the seconds taken.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from loratag.documents import Document, Passage, Span, open_writer
from loratag.labels import LabelSet, tags_to_spans

NO_SPACE_BEFORE = {".", ",", ";", ":", ")", "]", "}", "%", "'s", "n't"}
NO_SPACE_AFTER = {"(", "[", "{"}
FORMATS = {
    "bioc": ("bioc-xml", "{split}.bioc.xml"),
    "pubtator": ("pubtator", "{split}.pubtator"),
    "brat": ("brat", "{split}"),
}


def detokenize(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Text and each token's offsets in it."""
    text, offsets = "", []
    for i, t in enumerate(tokens):
        if i and t not in NO_SPACE_BEFORE and tokens[i - 1] not in NO_SPACE_AFTER:
            text += " "
        offsets.append((len(text), len(text) + len(t)))
        text += t
    return text, offsets


def documents(folder: Path, split: str) -> list[Document]:
    labels = LabelSet.from_mapping(json.loads((folder / "label.json").read_text()))
    rows = [json.loads(line) for line in (folder / f"{split}.json").read_text().splitlines() if line.strip()]
    with open(folder / "documents.tsv", newline="") as f:
        docs = [(r["doc_id"], int(r["sentences"])) for r in csv.DictReader(f, delimiter="\t") if r["split"] == split]
    assert sum(n for _, n in docs) == len(rows), f"{split}: documents.tsv does not cover {split}.json"
    out, i = [], 0
    for doc_id, n in docs:
        passages, spans, pos = [], [], 0
        for k, row in enumerate(rows[i : i + n]):
            text, offsets = detokenize(row["tokens"])
            if k == 0:
                passages.append(Passage(0, text, {"type": "title"}))
                pos = len(text) + 1
                base = 0
            else:
                if len(passages) == 1:
                    passages.append(Passage(pos, "", {"type": "abstract"}))
                sep = " " if passages[1].text else ""
                base = passages[1].offset + len(passages[1].text) + len(sep)
                passages[1] = Passage(passages[1].offset, passages[1].text + sep + text, {"type": "abstract"})
            tags = [labels.labels[t] for t in row["tags"]]
            for a, b, kind in tags_to_spans(tags):
                spans.append(Span(base + offsets[a][0], base + offsets[b - 1][1], kind))
        i += n
        out.append(Document(doc_id, tuple(passages), tuple(spans)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/bionlp2004"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    # the JSON Lines again, with tags as strings and no label.json: labels then sorted from the tags, as documents
    # give them, so that the label order is not what tells the two apart
    labels = LabelSet.from_mapping(json.loads((args.data / "label.json").read_text()))
    (args.out / "tner-sorted").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = [json.loads(x) for x in (args.data / f"{split}.json").read_text().splitlines() if x.strip()]
        lines = [json.dumps({"tokens": r["tokens"], "tags": [labels.labels[t] for t in r["tags"]]}) for r in rows]
        (args.out / "tner-sorted" / f"{split}.json").write_text("\n".join(lines) + "\n")
    for split in ("train", "validation", "test"):
        docs = documents(args.data, split)
        for name, (fmt, pattern) in FORMATS.items():
            (args.out / name).mkdir(parents=True, exist_ok=True)
            path = args.out / name / pattern.format(split=split)
            start = time.monotonic()
            with open_writer(path, fmt) as w:
                for d in docs:
                    w.write(d)
            row = {
                "split": split,
                "format": name,
                "documents": len(docs),
                "mentions": sum(len(d.spans) for d in docs),
                "seconds": round(time.monotonic() - start, 2),
                "path": str(path),
            }
            print(json.dumps(row))


if __name__ == "__main__":
    main()
