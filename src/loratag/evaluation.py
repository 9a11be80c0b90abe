"""Entity-level scores with seqeval (called directly: evaluate.load("seqeval") needs the Hub)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .data import Sentence
from .tagger import Tagger

MODE = "default (conlleval-compatible, seqeval)"


def mentions(tags: Sequence[Sequence[str]]) -> list[list[tuple[int, int, str]]]:
    """Each sentence's entities as seqeval chunks them (conlleval-compatible: a stray I- opens an entity), as
    inclusive ``(start, end, type)`` word spans."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [[(a, b, t) for t, a, b in get_entities(list(s))] for s in tags]


def scores(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], gold_mentions: list[list[tuple]] | None = None
) -> dict:
    """Overall precision / recall / F1 / accuracy and, per entity type, precision / recall / F1 / support; and
    ``untyped``: the same entities matched by their words only (boundaries, any type), as BioNLP papers often
    report. Entities are seqeval's (``mentions``), extracted once for typed and untyped scores: seqeval's own report
    extracts them again for every number it returns (7 passes over the corpus; benchmarks/bench_eval.py times
    both); the counting is ``span_scores``, and a test checks the result against seqeval's ``classification_report``
    and ``f1_score``. ``gold_mentions``: ``mentions(gold)``, when several predictions are scored against one gold."""
    from seqeval.metrics import accuracy_score

    gold, pred = [list(g) for g in gold], [list(p) for p in pred]
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted; every word must be scored")
    gold_spans, pred_spans = mentions(gold) if gold_mentions is None else gold_mentions, mentions(pred)
    typed = span_scores(gold_spans, pred_spans)
    untyped = span_scores(_untyped(gold_spans), _untyped(pred_spans))
    return {
        "precision": typed["precision"],
        "recall": typed["recall"],
        "f1": typed["f1"],
        "accuracy": float(accuracy_score(gold, pred)),
        "untyped": {k: untyped[k] for k in ("precision", "recall", "f1")},
        "per_type": typed["per_type"],
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
    # contexts from the whole list, then this process's share: a document's neighbours may be another's
    words = [s.tokens for s in sentences]
    contexts = tagger.contexts(words, [s.doc for s in sentences])
    mine_ctx = None if contexts is None else contexts[rank::world]
    logits = tagger.word_logits(words[rank::world], progress, contexts=mine_ctx)
    mine = ({d: [labels for labels, _ in tagger.decode_logits(logits, decode=d)] for d in names}, logits.windowed)
    parts = dist.gather(mine) if dist is not None else [mine]
    gold = [s.tags for s in sentences]
    ref = mentions(gold)
    by = {d: scores(gold, [parts[i % world][0][d][i // world] for i in range(len(sentences))], ref) for d in names}
    result = by[tagger.decode]
    if decodes:
        result["by_decode"] = {d: {k: v[k] for k in ("precision", "recall", "f1")} for d, v in by.items()}
    result["windowed_sentences"] = sum(n for _, n in parts)
    result["decode"] = tagger.decode
    result["autocast"] = tagger.precision  # the forward passes' dtype (fp32 / bf16 / fp16): F1 differs slightly
    if tagger.quantized:
        result["quantized"] = tagger.quantized  # int8 through ONNX Runtime: how (scales, ops), beside its F1
    return result


def _untyped(mentions) -> list[list[tuple]]:
    """The same mentions with their types left out: what untyped (boundary) scores compare."""
    return [[(a, b, "") for a, b, _ in m] for m in mentions]


def span_scores(gold: Sequence[Sequence[tuple]], pred: Sequence[Sequence[tuple]]) -> dict:
    """Exact-match precision / recall / F1 of ``(start, end, type)`` mentions, per document (or sentence), overall
    and per type (plain Python: seqeval scores tag sequences, these are offsets).

    >>> span_scores([[(0, 4, "P"), (9, 12, "D")]], [[(0, 4, "P"), (9, 11, "D")]])["f1"]
    0.5
    """
    tp, n_gold, n_pred = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred, strict=True):
        g, p = Counter(g), Counter(p)
        for (_, _, t), n in (g & p).items():
            tp[t] += n
        for (_, _, t), n in g.items():
            n_gold[t] += n
        for (_, _, t), n in p.items():
            n_pred[t] += n

    def prf(t: int, g: int, p: int) -> dict:
        precision, recall = t / p if p else 0.0, t / g if g else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1}

    total = prf(sum(tp.values()), sum(n_gold.values()), sum(n_pred.values()))
    per_type = {t: {**prf(tp[t], n_gold[t], n_pred[t]), "support": n_gold[t]} for t in sorted(n_gold | n_pred)}
    return {**total, "per_type": per_type, "gold": sum(n_gold.values()), "predicted": sum(n_pred.values())}


def document_scores(tagger: Tagger, documents: Sequence, progress: bool = False) -> dict:
    """Scores on character spans: the documents' passages tagged by the path `predict` takes (its own sentence and
    word split, no gold boundaries), mentions compared with the gold ones by offsets: ``exact`` (offsets and type)
    and ``boundary`` (offsets only)."""
    from .documents.tagging import tag_documents

    tagged = tag_documents(tagger, documents, progress=progress)
    gold = [[(s.start, s.end, s.type) for s in d.spans] for d in documents]
    pred = [[(s.start, s.end, s.type) for s in d.spans if s.ours] for d, _ in tagged]
    exact = span_scores(gold, pred)
    boundary = span_scores(_untyped(gold), _untyped(pred))
    return {
        "exact": exact,
        "boundary": {k: boundary[k] for k in ("precision", "recall", "f1")},
        "documents": len(documents),
        "note": "character offsets against the gold mentions after --types/--type-map/--discontinuous, overlapping "
        "ones included; text split as predict splits it",
    }
