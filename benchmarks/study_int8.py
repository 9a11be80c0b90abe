"""Which int8 scheme: chosen on the BioNLP2004 validation split, never on test. For each run given and each arm,
the int8 model tags the validation sentences; one JSON line per (run, arm) is appended to --out as it ends: F1
change against the same run in fp32 (points, typed and untyped), words labelled differently from fp32 (per 10,000),
and sentences per second (tagging only, this process alone). Arms already in --out are skipped.

    python benchmarks/study_int8.py RUN [RUN ...] --out benchmarks/results/int8-study-CPU-DATE.jsonl

Arms: torch_ao_tensor / torch_ao_channel (torch.ao quantize_dynamic on every Linear, per tensor / per output
channel: what --quantize int8 ran before); ort_tensor, ort_channel, ort_channel_rr (ONNX Runtime on the fused graph,
per tensor, per channel, per channel with 7-bit weights: the default); ort_channel_rr_matmul_only (attention's QKV
left fp32); keep_classifier, keep_ffn2_all, keep_ffn2_L, keep_layer_L (those matmuls left fp32, on top of
ort_channel_rr; keep_ffn2_0 won and is the default now).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, torch_ao_int8  # noqa: E402


def arms(layers: int) -> dict:
    from loratag.onnxrt import Int8Scheme

    out = {
        "torch_ao_tensor": "torch_ao_tensor",
        "torch_ao_channel": "torch_ao_channel",
        "ort_tensor": Int8Scheme(per_channel=False, reduce_range=False, keep_float=()),
        "ort_channel": Int8Scheme(reduce_range=False, keep_float=()),
        "ort_channel_rr": Int8Scheme(keep_float=()),
        "ort_channel_rr_matmul_only": Int8Scheme(ops=("MatMul",), keep_float=()),
        "keep_classifier": Int8Scheme(keep_float=("classifier",)),
        "keep_ffn2_all": Int8Scheme(keep_float=("/output/dense/MatMul",)),
    }
    for i in range(layers):
        # "/output/dense" and not "attention/output/dense": the feed-forward's second matmul of layer i
        out[f"keep_ffn2_{i}"] = Int8Scheme(keep_float=(f"layer.{i}/output/dense/MatMul",))
    for i in range(layers):
        out[f"keep_layer_{i}"] = Int8Scheme(keep_float=(f"layer.{i}/", f"Attention_{i}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arms", help="comma-separated subset [default: all]")
    a = p.parse_args()
    import transformers

    from loratag.config import CorpusSettings
    from loratag.corpus import load
    from loratag.evaluation import scores
    from loratag.onnxrt import OrtTokenClassifier, export_fp32, quantize_int8
    from loratag.tagger import Tagger

    transformers.logging.set_verbosity_error()
    done = set()
    if a.out.exists():
        done = {(r["run"], r["arm"]) for r in map(json.loads, a.out.read_text().splitlines()) if r.get("arm")}
    validation = load(a.data, CorpusSettings(), 42, only="validation").splits["validation"]
    words, gold = [s.tokens for s in validation], [s.tags for s in validation]
    cpu = cpu_facts()
    for run in a.runs:
        fp32 = Tagger.load(run, precision="fp32")
        reference = [labels for labels, _ in fp32.tag_words(words)]
        base = scores(gold, reference)
        chosen = arms(fp32.model.config.num_hidden_layers)
        if a.arms:
            chosen = {k: v for k, v in chosen.items() if k in a.arms.split(",")}
        with tempfile.TemporaryDirectory() as tmp:
            exported = Path(tmp) / "model.onnx"
            export_fp32(fp32.model, exported, fp32.tokenizer.pad_token_id or 0)
            for name, scheme in chosen.items():
                if (run, name) in done:
                    continue
                tagger = Tagger.load(run, precision="fp32")
                if isinstance(scheme, str):
                    tagger.model = torch_ao_int8(tagger.model, per_channel=scheme.endswith("channel"))
                else:
                    quantize_int8(exported, Path(tmp) / f"{name}.onnx", scheme)
                    tagger.model = OrtTokenClassifier(Path(tmp) / f"{name}.onnx", fp32.model.config)
                tagger.tag_words(words[:100])
                t = time.perf_counter()
                predicted = [labels for labels, _ in tagger.tag_words(words)]
                seconds = time.perf_counter() - t
                got = scores(gold, predicted)
                same = sum(x == y for p, r in zip(predicted, reference) for x, y in zip(p, r))
                row = {
                    "run": run,
                    "arm": name,
                    "split": "validation",
                    "fp32_f1": round(base["f1"], 4),
                    "f1": round(got["f1"], 4),
                    "f1_delta_points": round(100 * (got["f1"] - base["f1"]), 2),
                    "untyped_f1_delta_points": round(100 * (got["untyped"]["f1"] - base["untyped"]["f1"]), 2),
                    "words_changed_per_10k": round(1e4 * (1 - same / sum(map(len, reference))), 1),
                    "sentences_per_s": round(len(words) / seconds, 1),
                    "cpu": cpu,
                }
                with a.out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "cpu"}), flush=True)


if __name__ == "__main__":
    main()
