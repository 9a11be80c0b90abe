"""The `loratag` command: a thin shell over the library. Only this module turns errors into exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .config import (
    DECODINGS,
    PRECISIONS,
    Config,
    LoraSettings,
    ServeSettings,
    TrainConfig,
    option_fields,
    serve_fields,
    with_overrides,
)

EXAMPLES = """examples:
  loratag train --data ../shared/data/bionlp2004 --out runs/bionlp          # offline default (MiniLM)
  loratag train --config configs/bionlp2004-guide.json --out runs/guide     # the PEFT guide, exactly
  loratag train --model roberta-large --data tner/bionlp2004 --bias all --out runs/rl
  loratag train --out runs/bionlp --resume                                   # after a crash or kill
  loratag evaluate runs/bionlp --data ../shared/data/bionlp2004 --split test
  loratag predict runs/bionlp --text "IL-2 gene expression requires NF-kappa B."
  loratag predict runs/bionlp --input abstracts.jsonl --output entities.jsonl
  loratag predict runs/bionlp --input 'pubmed/*.jsonl.gz' --output tagged/       # sharded, resumable
  loratag predict runs/bionlp --input pubmed/ --output tagged/ --engine ray --ray-address auto
  loratag export runs/bionlp --out models/bionlp-merged                     # for transformers.pipeline
  loratag params --model roberta-large --bias all
"""


BASE_HELP = (
    "base model, instead of the one the run or adapter names: a hub name, a local directory, or minilm "
    "(for adapters whose base_model_name_or_path is another machine's path)"
)
DECODE_HELP = (
    "argmax: each word's most probable label (a stray I-X read as B-X, as conlleval does); constrained: the most "
    "probable valid IOB2 sequence (Viterbi: no I-X after O or after another type) [default: the run's own, "
    "chosen with --decode at training; argmax for plain PEFT adapters]"
)
PRECISION_HELP = (
    "dtype of the forward passes; auto: bf16 on CPUs with AMX or AVX-512-BF16 and on CUDA, else fp32 [default: auto]"
)


def _parse_value(f, text: str):
    kind = str(f.type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    if kind.startswith("tuple"):
        return tuple(p.strip() for p in text.split(",") if p.strip()) or None
    return text


def _add_fields(parser, cls, dest_prefix: str, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in option_fields(cls):
        if f.name in skip:
            continue
        flag = f.metadata["flag"]
        help_text = f"{f.metadata['help']} [default: {f.default}]"

        def convert(text: str, f=f):
            return _parse_value(f, text)

        convert.__name__ = str(f.type).split(" ")[0]  # argparse names the type in "invalid int value: 'x'"
        group.add_argument(
            flag,
            dest=f"{dest_prefix}{f.name}",
            type=convert,
            default=argparse.SUPPRESS,
            choices=f.metadata.get("choices"),
            metavar=f.metadata.get("metavar", f.name.upper()),
            help=help_text,
        )


def _config_from_args(args) -> Config:
    cfg = Config.load(args.config) if getattr(args, "config", None) else Config()
    given = vars(args)
    top = {k: given[k] for k in ("model", "data") if k in given}
    lora = {k[5:]: v for k, v in given.items() if k.startswith("lora.")}
    train = {k[6:]: v for k, v in given.items() if k.startswith("train.")}
    return with_overrides(cfg, top, lora, train)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loratag",
        description="Fine-tune transformer encoders with LoRA for token classification (NER), evaluate, predict.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"loratag {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a LoRA adapter and write a run directory",
        description="Train a LoRA adapter; evaluate on validation every epoch, keep the best by F1, "
        "then score it on test. Settings come from the defaults, then --config, then the flags.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--out", required=True, type=Path, help="run directory to write")
    t.add_argument("--config", type=Path, help="JSON config (e.g. configs/bionlp2004-guide.json); flags override it")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... [default: cuda if available]")
    for f in option_fields(Config):
        t.add_argument(f.metadata["flag"], dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"])
    _add_fields(t, LoraSettings, "lora.")
    _add_fields(t, TrainConfig, "train.")

    e = sub.add_parser("evaluate", help="score a run (or PEFT adapter) on a data split; prints JSON")
    e.add_argument("run", type=Path, help="run directory, or a PEFT adapter directory")
    e.add_argument("--data", required=True, help="hub dataset name or local data directory")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"))
    e.add_argument("--output", type=Path, help="write the metrics here [default: RUN/eval-SPLIT.json for runs]")
    e.add_argument(
        "--labels",
        type=Path,
        help="label.json (label -> id of the classifier head) for adapters saved without labels "
        "[default: the run's labels.json, else the adapter's config.json, else a label.json beside the data]",
    )
    e.add_argument("--base", help=BASE_HELP)
    e.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    e.add_argument("--decode", choices=DECODINGS, help=DECODE_HELP)
    e.add_argument("--device")

    pr = sub.add_parser(
        "predict",
        help="tag raw text or files: entities with character offsets",
        description="Raw text is split into sentences and words (GENIA-style), each word labelled by its first "
        "sub-token, IOB2 decoded into entities with character offsets and a score. Documents of any length: "
        "long sentences go through overlapping windows.",
    )
    pr.add_argument("run", type=Path, help="run directory, or a PEFT adapter directory")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one text to tag")
    src.add_argument(
        "--input",
        help="a folder of .txt files (one document each), .jsonl with a 'text' field, .conll/.tsv pre-split "
        "words, or plain text with one document per line (.gz too); with --output FOLDER: a folder or glob of "
        "shards, each read as one such file",
    )
    pr.add_argument(
        "--output",
        type=Path,
        help="write .jsonl (one document per line, in input order) or .conll; a folder (no extension): one output "
        "shard per input shard, written atomically, and a manifest.jsonl, so that a rerun after a crash skips "
        "the finished shards",
    )
    pr.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="for sharded prediction: this process, or a Ray cluster (pip install 'loratag[ray]') [default: local]",
    )
    pr.add_argument("--actors", type=int, default=1, help="--engine ray: model-holding actors [default: 1]")
    pr.add_argument("--ray-address", help="--engine ray: the cluster (auto, ray://host:10001) [default: a local one]")
    pr.add_argument("--words", action="store_true", help="print each word with its label instead of entities")
    pr.add_argument("--labels", type=Path, help="label.json for adapters saved without labels")
    pr.add_argument("--base", help=BASE_HELP)
    pr.add_argument("--quantize", choices=("int8",), help="dynamic int8 quantization of Linear layers (CPU)")
    pr.add_argument("--no-merge", action="store_true", help="keep the LoRA weights apart (slower; for checks)")
    pr.add_argument("--batch-size", type=int, default=64, help="sentences per batch [default: 64]")
    pr.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    pr.add_argument("--decode", choices=DECODINGS, help=DECODE_HELP)
    pr.add_argument("--device")

    pa = sub.add_parser(
        "params",
        help="count trainable parameters without loading weights",
        description="Builds the model on the meta device (only config.json is read) and prints PEFT's count.",
    )
    pa.add_argument("--model", help="hub name, local directory (config.json suffices), or minilm [default: minilm]")
    pa.add_argument("--num-labels", type=int, default=11, help="classifier size [default: 11, BioNLP2004]")
    pa.add_argument(
        "--config", type=Path, help="the model and LoRA settings of a config file (configs/bionlp2004-guide.json)"
    )
    _add_fields(pa, LoraSettings, "lora.")

    ex = sub.add_parser(
        "export",
        help="write a standalone transformers model (LoRA merged, head, id2label) for pipeline()",
        description="The result loads with transformers.pipeline('token-classification', model=DIR) as is.",
    )
    ex.add_argument("run", type=Path, help="run directory, or a PEFT adapter directory")
    ex.add_argument("--out", required=True, type=Path, help="directory to write")
    ex.add_argument("--labels", type=Path, help="label.json for adapters saved without labels")
    ex.add_argument("--base", help=BASE_HELP)
    ex.add_argument("--overwrite", action="store_true")

    sv = sub.add_parser(
        "serve",
        help="serve many adapters on one base model over HTTP (FastAPI)",
        description="Loads every run's adapter onto one shared base model and answers POST /v1/tag, "
        "GET /v1/adapters, /healthz, /metrics (Prometheus) and a web page at /. Concurrent requests are "
        "batched across adapters. Needs the serve extra: pip install 'loratag[serve]'.",
    )
    sv.add_argument("runs", nargs="*", help="run directories; RUN:NAME names the adapter [default: the folder name]")
    sv.add_argument("--runs-dir", type=Path, help="serve every run directory in this folder")
    sv.add_argument("--base", help="base model for every adapter, instead of the ones the runs name")
    sv.add_argument("--labels", type=Path, help="label.json for plain PEFT adapters that carry no label order")
    sv.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help=PRECISION_HELP + "; fp32 answers exactly as `loratag predict --precision fp32`",
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device")
    for f in serve_fields():  # the limits' defaults live in config.ServeSettings only
        sv.add_argument(
            f.metadata["flag"],
            dest=f"serve.{f.name}",
            type=type(f.default),
            default=f.default,
            metavar="MS" if f.name == "wait_ms" else "N",
            help=f"{f.metadata['help']} [default: {f.default}]",
        )
    sv.add_argument("--no-batching", action="store_true", help="one request per forward pass (for comparison)")
    sv.add_argument(
        "--workers",
        type=int,
        help="threads running forward passes side by side, the CPU cores shared among them "
        "[default: 2 on a CPU with 2+ cores, 1 on a GPU]",
    )

    pu = sub.add_parser("push", help="upload a run's adapter and model card to the Hugging Face Hub")
    pu.add_argument("run", type=Path)
    pu.add_argument("--repo-id", required=True, help="user/name on the Hub")
    pu.add_argument("--private", action="store_true")

    pl = sub.add_parser(
        "plot",
        help="draw validation F1 against wall-clock minutes, one line per run",
        description="Validation F1 after each evaluation against the minutes since each run began (training and "
        "evaluations), one line per run; a star marks the kept epoch, the legend gives test F1. A run still "
        "training is read from its checkpoint.",
        epilog="example:\n  loratag plot runs/guide runs/bionlp --out curves.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    pl.add_argument("--out", required=True, type=Path, help="image to write (.png, .svg or .pdf)")
    pl.add_argument("--title", help="title of the figure")
    return p


def _process_started() -> float:
    """``time.monotonic()`` at this process's start (Linux: from /proc, so the interpreter's start-up and the imports
    count against a --time-budget too); now where that cannot be read."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def _cmd_train(args) -> None:
    from .train import train

    given = [k for k in vars(args) if k in ("model", "data") or k.startswith(("lora.", "train."))]
    if args.resume and (given or args.config):
        raise ValueError("--resume continues with the settings saved in the run's config.json; drop the other flags")
    cfg = Config() if args.resume else _config_from_args(args)
    if not args.resume and not cfg.data:
        raise ValueError("--data is required (a hub dataset name or a local folder)")
    out = train(
        cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device, started=_process_started()
    )
    metrics = json.loads((out / "metrics.json").read_text())
    summary = {
        "run": str(out),
        "best_epoch": metrics["best_epoch"],
        "best_validation_f1": metrics["best_validation_f1"],
    }
    if "test" in metrics:
        summary["test"] = {k: metrics["test"][k] for k in ("precision", "recall", "f1", "accuracy")}
    print(json.dumps(summary))


def _cmd_evaluate(args) -> None:
    from .data import load_corpus
    from .evaluation import evaluate
    from .inference import Tagger, known_labels
    from .labels import LabelSet
    from .runio import write_json

    corpus = load_corpus(args.data)
    if args.split not in corpus.splits:
        raise ValueError(f"{args.data}: no {args.split} split; found {', '.join(corpus.splits)}")
    labels = LabelSet.load(args.labels) if args.labels else None
    if labels is None and known_labels(args.run) is None:
        # a plain adapter (the PEFT guide's code saves no labels): only a label.json beside the data says the
        # order of its classifier head; labels sorted from the tags seen would be a guess, and a wrong one
        # scores near zero without any error
        if corpus.labels_from is None:
            raise ValueError(
                f"{args.run}: the adapter does not say its label order and {args.data} has no label.json; "
                "pass --labels label.json (label -> id of the classifier head)"
            )
        logging.getLogger("loratag").info("labels: %s (the adapter carries none)", corpus.labels_from)
        labels = corpus.labels
    tagger = Tagger.load(
        args.run, labels=labels, device=args.device, base=args.base, precision=args.precision, decode=args.decode
    )
    unknown = set(corpus.labels.labels) - set(tagger.labels.labels)
    if unknown:  # label ids may be ordered differently; names must be known to the model
        raise ValueError(
            f"{args.data} has labels {sorted(unknown)} that {args.run} was not trained on "
            f"({', '.join(tagger.labels.labels)})"
        )
    result = {
        "run": str(args.run),
        "data": args.data,
        "split": args.split,
        **evaluate(tagger, corpus.splits[args.split], True),
    }
    output = args.output or (args.run / f"eval-{args.split}.json" if (args.run / "metrics.json").exists() else None)
    if output:
        write_json(Path(output), result)
    print(json.dumps(result))


def _sharded(args) -> bool:
    """Sharded prediction: --output is a folder (exists as one, or has no extension) and --input is given."""
    if args.output is None or args.input is None:
        return False
    return args.output.is_dir() or not args.output.suffix


def _cmd_predict(args) -> None:
    from .labels import LabelSet

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.actors < 1:
        raise ValueError(f"--actors must be >= 1, got {args.actors}")
    labels = LabelSet.load(args.labels) if args.labels else None
    load_kw = {
        "path": args.run,
        "labels": labels,
        "device": args.device,
        "merge": not args.no_merge,
        "quantize": args.quantize,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "base": args.base,
        "decode": args.decode,
    }
    if _sharded(args):
        from .shards import predict_shards

        summary = predict_shards(load_kw, args.input, args.output, args.engine, args.actors, args.ray_address)
        print(json.dumps(summary))
        return
    if args.engine != "local":
        raise ValueError("--engine ray tags shards: give --input (a folder or glob) and --output FOLDER")
    from .inference import Tagger
    from .predict import predict, read_texts

    texts = [args.text] if args.text is not None else read_texts(Path(args.input))
    tagger = Tagger.load(**load_kw)
    n = predict(tagger, texts, args.output, words=args.words, progress=args.output is not None)
    if args.output is not None:
        print(f"{n} documents -> {args.output}", file=sys.stderr)


def _cmd_params(args) -> None:
    from .labels import LabelSet
    from .modeling import build_model, count_parameters

    lora = {k[5:]: v for k, v in vars(args).items() if k.startswith("lora.")}
    base = Config.load(args.config) if args.config else Config()
    cfg = with_overrides(base, {"model": args.model} if args.model else {}, lora, {})
    if args.num_labels < 1:
        raise ValueError(f"--num-labels must be >= 1, got {args.num_labels}")
    n_types = (args.num_labels - 1) // 2
    names = ["O"] + [f"{p}-T{i}" for i in range(n_types) for p in "BI"]
    names += [f"B-X{i}" for i in range(args.num_labels - len(names))]
    trainable, total = count_parameters(build_model(cfg, LabelSet(tuple(names)), meta=True))
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def _cmd_export(args) -> None:
    from .inference import Tagger
    from .labels import LabelSet

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    labels = LabelSet.load(args.labels) if args.labels else None
    tagger = Tagger.load(args.run, labels=labels, device="cpu", base=args.base, precision="fp32")
    tagger.export(args.out)
    print(f"merged model -> {args.out}")


def _cmd_serve(args) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("loratag serve needs FastAPI and uvicorn: pip install 'loratag[serve]'") from None
    from .labels import LabelSet
    from .serve import AdapterPool, default_workers, parse_runs, run

    given = {k[len("serve.") :]: v for k, v in vars(args).items() if k.startswith("serve.")}
    workers = 1 if args.workers is None else args.workers  # checked here, chosen after the pool has loaded
    settings = ServeSettings(**given, batching=not args.no_batching, workers=workers)
    labels = LabelSet.load(args.labels) if args.labels else None
    runs = parse_runs(args.runs, args.runs_dir)
    pool = AdapterPool(runs, device=args.device, base=args.base, labels=labels, precision=args.precision)
    settings = dataclasses.replace(settings, workers=args.workers or default_workers(pool))
    run(pool, args.host, args.port, settings)


def _cmd_plot(args) -> None:
    from .plot import plot_runs

    print(plot_runs(args.runs, args.out, title=args.title))


def _cmd_push(args) -> None:
    from .hub import push

    print(push(args.run, args.repo_id, private=args.private))


COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "params": _cmd_params,
    "export": _cmd_export,
    "serve": _cmd_serve,
    "push": _cmd_push,
    "plot": _cmd_plot,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("loratag").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft 0.21
    try:
        import transformers

        transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
        if not sys.stderr.isatty():  # its "Loading weights" bars redraw with carriage returns: noise in a log
            transformers.utils.logging.disable_progress_bar()
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError, PermissionError) as e:
        print(f"loratag {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue with: loratag train --out RUN --resume)" if args.command == "train" else ""
        print(f"loratag {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0
