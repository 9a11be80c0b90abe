"""Inference speed: tag the BioNLP2004 test set (3,856 sentences, gold words) with one trained adapter
(a) the guide's way: PeftModel.from_pretrained on the base, unmerged, fp32, one sentence at a time;
(b) transformers' pipeline("token-classification") on the same unmerged PeftModel, batch size 16;
(c) loratag's Tagger (the path of `loratag predict` / `evaluate`) with its defaults, and with int8.
Prints one JSON line: sentences per second, peak memory and entity F1 (seqeval default mode) for each.

    python benchmarks/bench_infer.py RUN [--data ../shared/data/bionlp2004] [--sentences N]

Each arm runs alone in a fresh process; model loading is not timed, tagging is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit, run_arm  # noqa: E402


def _test(a):
    from loratag.data import load_corpus

    corpus = load_corpus(a.data)
    return corpus, corpus.splits["test"][: a.sentences]


def _peft_model(a, labels):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    from loratag.config import Config
    from loratag.modeling import load_tokenizer, resolve_model

    base_path = resolve_model(Config.load(Path(a.run) / "config.json").model)
    base = AutoModelForTokenClassification.from_pretrained(
        base_path, num_labels=len(labels), id2label=labels.id2label, label2id=labels.label2id
    )
    return PeftModel.from_pretrained(base, str(Path(a.run) / "adapter")).eval(), load_tokenizer(base_path)


def _score(sentences, predicted) -> float:
    from loratag.evaluation import scores

    return scores([s.tags for s in sentences], predicted)["f1"]


def guide_arm(a) -> dict:
    import torch

    corpus, test = _test(a)
    model, tok = _peft_model(a, corpus.labels)
    names = corpus.labels.labels
    predicted = []
    t = time.perf_counter()
    with torch.no_grad():
        for s in test:
            enc = tok(list(s.tokens), is_split_into_words=True, truncation=True, return_tensors="pt")
            ids = model(**enc).logits[0].argmax(-1).tolist()
            wids = enc.word_ids()
            predicted.append([names[ids[p]] for p, w in enumerate(wids) if w is not None and wids[p - 1] != w])
    seconds = time.perf_counter() - t
    return {"sentences_per_s": len(test) / seconds, "seconds": seconds, "f1": _score(test, predicted)}


def pipeline_arm(a) -> dict:
    from transformers import pipeline

    corpus, test = _test(a)
    model, tok = _peft_model(a, corpus.labels)
    pipe = pipeline("token-classification", model=model, tokenizer=tok, batch_size=16, device="cpu")
    texts, starts = [], []
    for s in test:
        pos, st = 0, []
        for w in s.tokens:
            st.append(pos)
            pos += len(w) + 1
        texts.append(" ".join(s.tokens))
        starts.append(st)
    t = time.perf_counter()
    outputs = pipe(texts)
    seconds = time.perf_counter() - t
    predicted = []
    for st, out in zip(starts, outputs):
        by_start = {o["start"]: o["entity"] for o in out}  # pipeline drops "O"; first sub-token starts the word
        predicted.append([by_start.get(x, "O") for x in st])
    return {"sentences_per_s": len(test) / seconds, "seconds": seconds, "f1": _score(test, predicted)}


def loratag_arm(a, quantize=None) -> dict:
    from loratag.tagger import Tagger

    _, test = _test(a)
    tagger = Tagger.load(a.run, quantize=quantize)
    t = time.perf_counter()
    predicted = [labels for labels, _ in tagger.tag_words([s.tokens for s in test])]
    seconds = time.perf_counter() - t
    return {
        "sentences_per_s": len(test) / seconds,
        "seconds": seconds,
        "f1": _score(test, predicted),
        "autocast": str(tagger.dtype),
        "batch_size": tagger.batch_size,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a loratag run directory (its adapter/ is used by every arm)")
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--sentences", type=int, default=None, help="first N test sentences [default: all 3,856]")
    p.add_argument("--arms", default="guide,pipeline,loratag,loratag_int8")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        import transformers

        transformers.logging.set_verbosity_error()
        arms = {
            "guide": guide_arm,
            "pipeline": pipeline_arm,
            "loratag": loratag_arm,
            "loratag_int8": lambda a: loratag_arm(a, "int8"),
        }
        emit(arms[a.arm](a))
        return
    args = [a.run, "--data", a.data] + (["--sentences", str(a.sentences)] if a.sentences else [])
    results = {arm: run_arm(__file__, arm, args) for arm in a.arms.split(",")}
    out = {"run": a.run, "sentences": a.sentences or "all", **results}
    if "loratag" in results:
        for ref in ("guide", "pipeline"):
            if ref in results:
                out[f"speedup_vs_{ref}"] = round(
                    results["loratag"]["sentences_per_s"] / results[ref]["sentences_per_s"], 2
                )
        ref = results.get("guide") or results.get("pipeline")
        if ref:
            out["f1_delta_points_vs_unmerged"] = round(100 * (results["loratag"]["f1"] - ref["f1"]), 3)
            if "loratag_int8" in results:
                out["int8_f1_delta_points"] = round(100 * (results["loratag_int8"]["f1"] - ref["f1"]), 3)
                out["int8_speedup_vs_pipeline"] = round(
                    results["loratag_int8"]["sentences_per_s"] / results.get("pipeline", ref)["sentences_per_s"], 2
                )
    out["cpu"] = cpu_facts()
    emit(out)


if __name__ == "__main__":
    main()
