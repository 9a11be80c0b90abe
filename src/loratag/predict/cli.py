"""`loratag predict`: its flags and the command (one text, one file, or a folder of shards on one or many machines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cliargs import adapter_flags, decode_flag, device_flag, precision_flag


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        parents=[adapter_flags(), precision_flag(), decode_flag(), device_flag()],
        help="tag raw text or files: entities with character offsets",
        description="Raw text is split into sentences and words (GENIA-style), each word labelled by its first "
        "sub-token, IOB2 decoded into entities with character offsets and a score. Documents of any length: "
        "long sentences go through overlapping windows.",
    )
    p.add_argument("run", type=Path, help="run directory, or a PEFT adapter directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one text to tag")
    src.add_argument(
        "--input",
        help="a folder of .txt files (one document each), .jsonl with a 'text' field, .conll/.tsv pre-split "
        "words, or plain text with one document per line (.gz too); with --output FOLDER: a folder or glob of "
        "shards, each read as one such file",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="write .jsonl (one document per line, in input order) or .conll (word and label columns), either "
        "gzipped with .gz; any other suffix is an error. A folder (no extension): one output shard per input shard, "
        "written atomically, and a manifest.jsonl, so that a rerun after a crash skips the finished shards",
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="for sharded prediction: this process, or a Ray cluster (pip install 'loratag[ray]') [default: local]",
    )
    p.add_argument("--actors", type=int, default=1, help="--engine ray: model-holding actors [default: 1]")
    p.add_argument("--ray-address", help="--engine ray: the cluster (auto, ray://host:10001) [default: a local one]")
    p.add_argument("--words", action="store_true", help="print each word with its label instead of entities")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="dynamic int8 quantization of the Linear layers (CPU; fp32 around them, so --precision must be auto or "
        "fp32)",
    )
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA weights apart (slower; for checks)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch [default: 64]")
    p.set_defaults(run_command=run)


def _sharded(args) -> bool:
    """Sharded prediction: --output is a folder (exists as one, or has no extension) and --input is given."""
    if args.output is None or args.input is None:
        return False
    return args.output.is_dir() or not args.output.suffix


def run(args) -> None:
    from ..labels import LabelSet
    from .formats import output_format
    from .shards import TaggerSpec

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.actors < 1:
        raise ValueError(f"--actors must be >= 1, got {args.actors}")
    spec = TaggerSpec(
        path=args.run,
        labels=LabelSet.load(args.labels) if args.labels else None,
        device=args.device,
        merge=not args.no_merge,
        quantize=args.quantize,
        precision=args.precision,
        batch_size=args.batch_size,
        base=args.base,
        decode=args.decode,
    )
    if _sharded(args):
        from .shards import local_engine, predict_shards

        engine = local_engine
        if args.engine == "ray":
            from .ray import ray_engine

            engine = ray_engine(args.actors, args.ray_address)
        print(json.dumps(predict_shards(spec, args.input, args.output, engine)))
        return
    if args.engine != "local":
        raise ValueError("--engine ray tags shards: give --input (a folder or glob) and --output FOLDER")
    if args.output is not None:
        output_format(args.output)  # an unknown format stops here, before the model loads
    from .formats import predict, read_texts

    texts = [args.text] if args.text is not None else read_texts(Path(args.input))
    tagger = spec.load()
    n = predict(tagger, texts, args.output, words=args.words, progress=args.output is not None)
    if args.output is not None:
        print(f"{n} documents -> {args.output}", file=sys.stderr)
