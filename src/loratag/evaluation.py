"""Entity-level scores with seqeval (called directly: evaluate.load("seqeval") needs the Hub)."""

from __future__ import annotations

from collections.abc import Sequence

from .data import Sentence
from .tagger import Tagger

MODE = "default (conlleval-compatible, seqeval)"


def scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Overall precision / recall / F1 / accuracy and, per entity type, precision / recall / F1 / support."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    gold, pred = [list(g) for g in gold], [list(p) for p in pred]
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted; every word must be scored")
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    # plain floats, not numpy's: scores go into checkpoints, which hold plain values only
    per_type = {
        k: {
            "precision": float(v["precision"]),
            "recall": float(v["recall"]),
            "f1": float(v["f1-score"]),
            "support": int(v["support"]),
        }
        for k, v in report.items()
        if not k.endswith(" avg")
    }
    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "accuracy": float(accuracy_score(gold, pred)),
        "per_type": per_type,
        "sentences": len(gold),
        "words": sum(len(g) for g in gold),
        "mode": MODE,
    }


def evaluate(
    tagger: Tagger, sentences: Sequence[Sentence], progress: bool = False, dist=None, decodes: Sequence[str] = ()
) -> dict:
    """Scores of the tagger on gold sentences; every gold word is predicted (long ones through windows).
    ``dist`` (data-parallel training): each process predicts every world-th sentence, the predictions are
    gathered, and every sentence is scored once. ``decodes``: also score these decodings of the same forward pass
    (``by_decode``: overall precision, recall and F1 of each); the main scores are the tagger's own decoding."""
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    names = (tagger.decode, *[d for d in decodes if d != tagger.decode])
    logits = tagger.word_logits([s.tokens for s in sentences[rank::world]], progress)
    mine = ({d: [labels for labels, _ in tagger.decode_logits(logits, decode=d)] for d in names}, logits.windowed)
    parts = dist.gather(mine) if dist is not None else [mine]
    gold = [s.tags for s in sentences]
    by = {d: scores(gold, [parts[i % world][0][d][i // world] for i in range(len(sentences))]) for d in names}
    result = by[tagger.decode]
    if decodes:
        result["by_decode"] = {d: {k: v[k] for k in ("precision", "recall", "f1")} for d, v in by.items()}
    result["windowed_sentences"] = sum(n for _, n in parts)
    result["decode"] = tagger.decode
    result["autocast"] = tagger.precision  # the forward passes' dtype (fp32 / bf16 / fp16): F1 differs slightly
    return result
