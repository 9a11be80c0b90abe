"""Where a test evaluation's time goes, and what scoring seqeval's entities once saves: tag the BioNLP2004 test set
(3,856 sentences) with one run, then score both decodings (argmax and constrained) (a) as seqeval's report does it
(classification_report + precision/recall/f1/accuracy: entities extracted 7 times per decoding) and (b) as
evaluation.scores does it (entities once, gold shared). Prints one JSON line with seconds per part, CPU flags and
the measured matmul peak; the F1s of (a) and (b) must agree.

    python benchmarks/bench_eval.py RUN [--data ../shared/data/bionlp2004] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit, matmul_peak  # noqa: E402


def seqeval_report(gold, pred) -> float:
    """The scoring loratag did before: seqeval's report and its overall numbers, each extracting entities anew."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    classification_report(gold, pred, output_dict=True, zero_division=0)
    precision_score(gold, pred, zero_division=0), recall_score(gold, pred, zero_division=0)
    accuracy_score(gold, pred)
    return f1_score(gold, pred, zero_division=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--data", default="../shared/data/bionlp2004")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    from loratag.config import DECODINGS
    from loratag.data import load_corpus
    from loratag.evaluation import mentions, scores
    from loratag.tagger import Tagger

    peak = matmul_peak()
    tagger = Tagger.load(a.run)
    test = load_corpus(a.data).splits["test"]
    words, gold = [s.tokens for s in test], [list(s.tags) for s in test]
    tagger.word_logits(words[:200])  # warm-up
    t = time.perf_counter()
    logits = tagger.word_logits(words)
    forward = time.perf_counter() - t
    t = time.perf_counter()
    preds = {d: [labels for labels, _ in tagger.decode_logits(logits, decode=d)] for d in DECODINGS}
    decoding = time.perf_counter() - t
    old, new = [], []
    for _ in range(a.repeat):
        t = time.perf_counter()
        f_old = {d: seqeval_report(gold, preds[d]) for d in DECODINGS}
        old.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = mentions(gold)
        f_new = {d: scores(gold, preds[d], ref)["f1"] for d in DECODINGS}
        new.append(time.perf_counter() - t)
    assert all(abs(f_old[d] - f_new[d]) < 1e-12 for d in DECODINGS), (f_old, f_new)
    emit({
        "sentences": len(test),
        "precision": tagger.precision,
        "forward_s": round(forward, 2),
        "decode_both_s": round(decoding, 2),
        "scoring_seqeval_report_s": round(min(old), 2),
        "scoring_once_s": round(min(new), 2),
        "scoring_speedup": round(min(old) / min(new), 1),
        "evaluation_before_s": round(forward + decoding + min(old), 2),
        "evaluation_now_s": round(forward + decoding + min(new), 2),
        "f1": {d: round(f_new[d], 4) for d in DECODINGS},
        "cpu": cpu_facts(),
        "matmul_peak_gflops": peak,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    })  # fmt: skip


if __name__ == "__main__":
    main()
