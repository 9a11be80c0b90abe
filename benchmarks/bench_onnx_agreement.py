"""Does the ONNX export answer as loratag predict does? `loratag export RUN --onnx --quantize int8` writes a folder;
onnxruntime alone (with the exported tokenizer, no loratag, no torch) tags the BioNLP2004 test sentences one at a
time, each word taking its first sub-token's most probable label; loratag's Tagger (the path of predict) tags the
same words with --decode argmax, in fp32 and with --quantize int8. Prints one JSON line: the share of words whose
labels agree, and of sentences that agree entirely, for fp32 (expected: all) and int8 (activation scales are per
batch, so re-batching moves a few words), and each side's test F1.

    python benchmarks/bench_onnx_agreement.py RUN [--data ../shared/data/bionlp2004] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit  # noqa: E402


def ort_alone(folder: Path, file: str, sentences: list[list[str]]) -> list[list[str]]:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    session = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
    out = []
    for words in sentences:
        enc = tok.encode(words, is_pretokenized=True)
        feed = {"input_ids": np.array([enc.ids]), "attention_mask": np.array([enc.attention_mask])}
        logits = session.run(["logits"], feed)[0][0]
        ids = enc.word_ids
        first = [p for p, w in enumerate(ids) if w is not None and (p == 0 or ids[p - 1] != w)]
        out.append([id2label[str(i)] for i in logits[first].argmax(-1)])
    return out


def agreement(a: list[list[str]], b: list[list[str]]) -> dict:
    from loratag.labels import repair_iob2

    b = [repair_iob2(x)[0] for x in b]  # as loratag's argmax reads a stray I-X
    words = sum(map(len, a))
    return {
        "words_agree": round(sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)) / words, 5),
        "sentences_agree": round(sum(p == q for p, q in zip(a, b)) / len(a), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--out", type=Path, help="export here [default: a temporary folder]")
    a = p.parse_args()
    import transformers

    from loratag.cli import main as loratag
    from loratag.config import CorpusSettings
    from loratag.corpus import load
    from loratag.evaluation import scores
    from loratag.tagger import Tagger

    transformers.logging.set_verbosity_error()
    test = load(a.data, CorpusSettings(), 42, only="test").splits["test"]
    words, gold = [s.tokens for s in test], [s.tags for s in test]
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.out or Path(tmp) / "onnx"
        if loratag(["export", a.run, "--out", str(folder), "--onnx", "--quantize", "int8", "--overwrite"]) != 0:
            raise SystemExit("export failed")
        result = {"run": a.run, "sentences": len(words)}
        for name, kw, file in (
            ("fp32", {"precision": "fp32"}, "model.onnx"),
            ("int8", {"quantize": "int8"}, "model_quantized.onnx"),
        ):
            ours = [labels for labels, _ in Tagger.load(a.run, decode="argmax", **kw).tag_words(words)]
            theirs = ort_alone(folder, file, words)
            result[name] = {
                **agreement(ours, theirs),
                "loratag_predict_f1": round(scores(gold, ours)["f1"], 4),
                "onnxruntime_alone_f1": round(scores(gold, theirs)["f1"], 4),
            }
    result["cpu"] = cpu_facts()
    emit(result)


if __name__ == "__main__":
    main()
