"""The serving pool (stacked adapters, per-row biases) against `loratag predict` (Tagger.load: merged), in bf16 and
in fp32: how many sentences and words get another label, the largest score difference of the same entity, and the
pool's sentences/s in each precision (the best of --repeats passes). Prints one JSON line.

    python benchmarks/bench_serve_precision.py --adapter runs/bionlp --adapter guide-adapter --labels label.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", type=Path, action="append", required=True, help="a run or a plain PEFT adapter")
    p.add_argument("--labels", type=Path, help="label.json for plain adapters")
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--sentences", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from loratag.data import load_corpus
    from loratag.labels import LabelSet
    from loratag.serve.pool import AdapterPool
    from loratag.tagger import Tagger

    labels = LabelSet.load(a.labels) if a.labels else None
    runs = [(path, f"a{i}") for i, path in enumerate(a.adapter)]
    test = load_corpus(a.data).splits["test"]
    texts = [" ".join(s.tokens) for s in random.Random(0).sample(test, a.sentences)]
    out = {}
    for precision in ("bf16", "fp32"):
        pool = AdapterPool(runs, labels=labels, precision=precision)
        for path, name in runs:
            ref = Tagger.load(path, labels=labels, precision=precision).tag_documents(texts)
            best = float("inf")
            for _ in range(a.repeats):
                t = time.perf_counter()
                got = pool.tag([name] * len(texts), texts)
                best = min(best, time.perf_counter() - t)
            spans = [(x.start, x.end, x.label) for d in ref for x in d.entities]
            diff_sentences = sum(
                [(e.start, e.end, e.label) for e in r.entities] != [(e.start, e.end, e.label) for e in g.entities]
                for r, g in zip(ref, got)
            )
            words = sum(len(d.labels) for d in ref)
            diff_words = sum(x != y for r, g in zip(ref, got) for x, y in zip(r.labels, g.labels))
            same_entity = [
                abs(x.score - y.score)
                for r, g in zip(ref, got)
                for x, y in zip(r.entities, g.entities)
                if (x.start, x.end, x.label) == (y.start, y.end, y.label)
            ]
            out[f"{precision}/{path.name}"] = {
                "sentences_with_other_spans_or_labels": diff_sentences,
                "sentences": len(texts),
                "words_with_other_label": diff_words,
                "words": words,
                "entities": len(spans),
                "max_score_diff_same_entity": round(max(same_entity, default=0.0), 4),
                "pool_sentences_per_s": round(len(texts) / best, 1),
            }
    for path, _ in runs:
        bf16, fp32 = out[f"bf16/{path.name}"], out[f"fp32/{path.name}"]
        bf16["speed_vs_fp32"] = round(bf16["pool_sentences_per_s"] / fp32["pool_sentences_per_s"], 2)
    emit({"bench": "serve_precision", "results": out, "cpu": cpu_facts()})


if __name__ == "__main__":
    main()
