"""How often loratag's raw-text word split reproduces the gold JNLPBA tokens of the BioNLP2004 test set.

The test set has no raw text, so each gold sentence is first detokenized the way running text is written
(no space before , . ; : ) ] } % and 's / n't, none after ( [ {, GENIA's `` '' back to ") and then split again
with loratag.text.split_words. Prints one JSON line: the share of sentences split exactly as gold, and token
precision / recall (tokens compared with their character offsets).

    python benchmarks/word_split_agreement.py [--data ../shared/data/bionlp2004]
"""

from __future__ import annotations

import argparse
import json
import os

from loratag.data import load_corpus
from loratag.text import split_words

NO_SPACE_BEFORE = {",", ".", ";", ":", ")", "]", "}", "%", "'s", "n't", "''"}
NO_SPACE_AFTER = {"(", "[", "{", "``"}


def detokenize(tokens: tuple[str, ...]) -> tuple[str, list[tuple[int, int]]]:
    text, spans, glue = "", [], True
    for tok in tokens:
        shown = '"' if tok in ("``", "''") else tok
        if text and not glue and tok not in NO_SPACE_BEFORE:
            text += " "
        spans.append((len(text), len(text) + len(shown)))
        text += shown
        glue = tok in NO_SPACE_AFTER
    return text, spans


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    a = p.parse_args()
    test = load_corpus(a.data).splits["test"]
    exact = tp = n_gold = n_pred = 0
    for s in test:
        text, spans = detokenize(s.tokens)
        pred = {(w.start, w.end) for w in split_words(text)}
        gold = set(spans)
        exact += pred == gold
        tp += len(pred & gold)
        n_gold += len(gold)
        n_pred += len(pred)
    print(
        json.dumps(
            {
                "sentences": len(test),
                "sentences_split_as_gold": round(exact / len(test), 4),
                "token_precision": round(tp / n_pred, 4),
                "token_recall": round(tp / n_gold, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
