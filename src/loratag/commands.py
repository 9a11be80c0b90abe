"""The small commands, each its flags next to what it does: evaluate, params, export, push, plot. (train, predict and
serve are packages of their own, with their flags in their cli.py.)"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from .cliargs import (
    adapter_flags,
    add_config_flags,
    decode_flag,
    device_flag,
    given,
    precision_flag,
    quantize_flag,
    with_overrides,
)
from .config import Config, CorpusSettings, LoraSettings

# ---- evaluate -------------------------------------------------------------------------------------------------------


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[adapter_flags(), precision_flag(), quantize_flag(), decode_flag(), device_flag()],
        help="score a run (or PEFT adapter) on a data split; prints JSON",
        description="Scores a split with seqeval (entities over words, typed, and untyped boundaries) and, for data "
        "read from documents, on character spans as predict tags them. The data: --data, or a file per split "
        "(--test FILE ...), or else the run's own (its config.json); --types, --type-map, --overlaps and "
        "--discontinuous default to the run's.",
    )
    p.add_argument("run", type=Path, help="run directory, or a PEFT adapter directory")
    p.add_argument("--data", help="hub dataset name or local data directory [default: the run's]")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--output", type=Path, help="write the metrics here [default: RUN/eval-SPLIT.json for runs]")
    add_config_flags(p, CorpusSettings, "corpus")
    p.set_defaults(run_command=evaluate)


def _evaluation_data(args):
    """The corpus to score: the flags', else the run's data; the run's span policy and seed unless flags say."""
    from .corpus import load
    from .rundir import CONFIG

    run_cfg = Config.load(args.run / CONFIG) if (args.run / CONFIG).is_file() else None
    flags = given(args, CorpusSettings, "corpus")
    files = {k for k in ("train", "validation", "test") if k in flags}
    base = run_cfg.corpus if run_cfg else CorpusSettings()
    if args.data or files:
        base = replace(base, train=None, validation=None, test=None)
        data = args.data or ""
    elif run_cfg is not None and (run_cfg.data or run_cfg.corpus.train):
        data = run_cfg.data
    else:
        raise ValueError(f"{args.run}: no data to score; pass --data DIR or --{args.split} FILE")
    settings = replace(base, **flags)
    seed = run_cfg.train.seed if run_cfg else 42
    return load(data, settings, seed, only=args.split), data or getattr(settings, args.split) or settings.train


def evaluate(args) -> None:
    from .evaluation import document_scores
    from .evaluation import evaluate as score
    from .labels import LabelSet
    from .rundir import METRICS, known_labels, write_json
    from .tagger import Tagger

    corpus, source = _evaluation_data(args)
    if args.split not in corpus.splits:
        raise ValueError(f"{source}: no {args.split} split; found {', '.join(corpus.splits)}")
    labels = LabelSet.load(args.labels) if args.labels else None
    if labels is None and known_labels(args.run) is None:
        # a plain adapter (the PEFT guide's code saves no labels): only a label.json beside the data says the
        # order of its classifier head; labels sorted from the tags seen would be a guess, and a wrong one
        # scores near zero without any error
        if corpus.labels_from is None:
            raise ValueError(
                f"{args.run}: the adapter does not say its label order and {source} has no label.json; "
                "pass --labels label.json (label -> id of the classifier head)"
            )
        logging.getLogger("loratag").info("labels: %s (the adapter carries none)", corpus.labels_from)
        labels = corpus.labels
    tagger = Tagger.load(
        args.run, labels=labels, device=args.device, base=args.base, precision=args.precision, decode=args.decode,
        quantize=args.quantize,
    )  # fmt: skip
    unknown = set(corpus.labels.labels) - set(tagger.labels.labels)
    if unknown:  # label ids may be ordered differently; names must be known to the model
        raise ValueError(
            f"{source} has labels {sorted(unknown)} that {args.run} was not trained on "
            f"({', '.join(tagger.labels.labels)})"
        )
    result = {"run": str(args.run), "data": str(source), "split": args.split}
    result.update(score(tagger, corpus.splits[args.split], True))
    if args.split in corpus.documents:
        result["characters"] = document_scores(tagger, corpus.documents[args.split], True)
    if corpus.report.get(args.split, {}).get("repairs"):
        result["repairs"] = corpus.report[args.split]["repairs"]
    name = f"eval-{args.split}" + ("-int8" if args.quantize else "")  # never over the float figures
    output = args.output or (args.run / f"{name}.json" if (args.run / METRICS).exists() else None)
    if output:
        write_json(Path(output), result)
    print(json.dumps(result))


# ---- params ---------------------------------------------------------------------------------------------------------


def add_params(sub) -> None:
    p = sub.add_parser(
        "params",
        help="count trainable parameters without loading weights",
        description="Builds the model on the meta device (only config.json is read) and prints PEFT's count.",
    )
    p.add_argument("--model", help="hub name, local directory (config.json suffices), or minilm [default: minilm]")
    p.add_argument("--num-labels", type=int, default=11, help="classifier size [default: 11, BioNLP2004]")
    p.add_argument(
        "--config", type=Path, help="the model and LoRA settings of a config file (configs/bionlp2004-guide.json)"
    )
    add_config_flags(p, LoraSettings, "lora")
    p.set_defaults(run_command=params)


def params(args) -> None:
    from .labels import LabelSet
    from .modeling import build_model, count_parameters

    base = Config.load(args.config) if args.config else Config()
    cfg = with_overrides(base, {"model": args.model} if args.model else {}, given(args, LoraSettings, "lora"), {})
    if args.num_labels < 1:
        raise ValueError(f"--num-labels must be >= 1, got {args.num_labels}")
    n_types = (args.num_labels - 1) // 2
    names = ["O"] + [f"{p}-T{i}" for i in range(n_types) for p in "BI"]
    names += [f"B-X{i}" for i in range(args.num_labels - len(names))]
    trainable, total = count_parameters(build_model(cfg, LabelSet(tuple(names)), meta=True))
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


# ---- export ---------------------------------------------------------------------------------------------------------


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        parents=[adapter_flags()],
        help="write a standalone model: transformers (for pipeline()) or ONNX (for onnxruntime)",
        description="Without --onnx, a transformers model (LoRA merged, the adapter's head, id2label) that loads with "
        "transformers.pipeline('token-classification', model=DIR) as is. With --onnx, model.onnx (fp32; attention, "
        "LayerNorm and GELU fused as ONNX Runtime's optimizer does) and, with --quantize int8, model_quantized.onnx, "
        "beside config.json (id2label), the tokenizer and onnx.json; inputs input_ids and attention_mask, output "
        "logits; each word takes its first sub-token's label. onnxruntime alone runs them (docs/int8.md shows how).",
    )
    p.add_argument("run", type=Path, help="run directory, or a PEFT adapter directory")
    p.add_argument("--out", required=True, type=Path, help="directory to write")
    p.add_argument("--onnx", action="store_true", help="write ONNX files for onnxruntime instead")
    p.add_argument("--quantize", choices=("int8",), help="with --onnx: also the int8 model (model_quantized.onnx)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run_command=export)


def export(args) -> None:
    from .labels import LabelSet
    from .tagger import Tagger, export_transformers

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    if args.quantize and not args.onnx:
        raise ValueError("--quantize int8 writes an ONNX model: add --onnx")
    labels = LabelSet.load(args.labels) if args.labels else None
    tagger = Tagger.load(args.run, labels=labels, device="cpu", base=args.base, precision="fp32")
    if args.onnx:
        from .onnxrt import export_dir

        record = export_dir(tagger, args.out, args.quantize)
        print(f"ONNX ({', '.join(record['files'].values())}) -> {args.out}")
        return
    export_transformers(tagger, args.out)
    print(f"merged model -> {args.out}")


# ---- push and plot --------------------------------------------------------------------------------------------------


def add_push(sub) -> None:
    p = sub.add_parser("push", help="upload a run's adapter and model card to the Hugging Face Hub")
    p.add_argument("run", type=Path)
    p.add_argument("--repo-id", required=True, help="user/name on the Hub")
    p.add_argument("--private", action="store_true")
    p.set_defaults(run_command=push)


def push(args) -> None:
    from .hub import push as upload

    print(upload(args.run, args.repo_id, private=args.private))


def add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="draw validation F1 against wall-clock minutes, one line per run",
        description="Validation F1 after each evaluation against the minutes since each run began (training and "
        "evaluations), one line per run; a star marks the kept epoch, the legend gives test F1. A run still "
        "training is read from its checkpoint.",
        epilog="example:\n  loratag plot runs/guide runs/bionlp --out curves.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    p.add_argument("--out", required=True, type=Path, help="image to write (.png, .svg or .pdf)")
    p.add_argument("--title", help="title of the figure")
    p.set_defaults(run_command=plot)


def plot(args) -> None:
    from .plot import plot_runs

    print(plot_runs(args.runs, args.out, title=args.title))


# ---- average --------------------------------------------------------------------------------------------------------


def add_average(sub) -> None:
    p = sub.add_parser(
        "average",
        help="one adapter from several runs (seeds): the mean of their updates, free at inference",
        description="Writes a run directory whose adapter's weight update is exactly the mean of the runs' (a LoRA "
        "of rank r x runs: their A matrices stacked, their B matrices side by side; biases and classifier heads "
        "averaged), then scores it on the runs' validation and test data into metrics.json. The runs must share "
        "base, labels, LoRA targets, --context and --decode (typically the same command with other --seed). "
        "The result loads wherever a run does: evaluate, predict, export, serve, PeftModel.from_pretrained.",
        epilog="example: loratag average runs/s42 runs/s43 runs/s44 --out runs/soup",
    )
    p.add_argument(
        "runs", type=Path, nargs="+",
        help="run directories (their kept adapter/) to average; RUN/last stands for a run's last epoch",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the new run directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run_command=average)


def average(args) -> None:
    from .average import average_runs

    metrics = average_runs(args.runs, args.out, args.overwrite)
    summary = {"out": str(args.out), "lora_rank": metrics["lora_rank"]}
    for split in ("validation", "test"):
        if split in metrics:
            m = metrics[split]
            summary[split] = {"f1": m["f1"], "untyped_f1": m["untyped"]["f1"], "decode": m["decode"]}
    print(json.dumps(summary))
