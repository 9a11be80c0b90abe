"""`loratag predict`: its flags and the command (one text, one file, or a folder of shards on one or many machines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cliargs import adapter_flags, decode_flag, device_flag, precision_flag, quantize_flag
from ..documents import READ_FORMATS, WRITE_FORMATS


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        parents=[adapter_flags(), precision_flag(), quantize_flag(), decode_flag(), device_flag()],
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
        help="documents to tag: BioC XML/JSON, PubTator, a brat folder, Label Studio JSON, JSON Lines with a 'text' "
        "field (Prodigy, doccano, loratag's own output), spaCy .spacy, a folder of .txt files (one document each), "
        "plain text with one document per line, or pre-split words (.conll/.tsv, tner JSON Lines); .gz too. The "
        "format is detected from the name and the content (--input-format where it cannot tell). With --output "
        "FOLDER: a folder or glob of shards, each read as one such file",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="write the tagged documents, in the format its name says: .jsonl (one document per line: text and "
        "entities), .conll (words and labels), .bioc.xml, .bioc.json, .pubtator, .spacy, .labelstudio.json "
        "(predictions to import), .prodigy.jsonl; .gz too. A document read from BioC, PubTator or Label Studio "
        "comes back with its id, passages and infons, our mentions as its annotations. A folder (no extension): one "
        "output shard per input shard, written atomically, and a manifest.jsonl, so that a rerun after a crash skips "
        "the finished shards; with --format brat: a brat folder (NAME.txt + NAME.ann)",
    )
    p.add_argument(
        "--format",
        choices=WRITE_FORMATS,
        help="the output format, instead of the one --output's name says (brat: --output is a folder; sharded "
        "prediction: each shard's format) [default: by name; jsonl for shards]",
    )
    p.add_argument("--input-format", choices=READ_FORMATS, help="the input format, where detection cannot tell")
    p.add_argument(
        "--keep-annotations",
        action="store_true",
        help="keep the input's own annotations beside ours (ours marked as loratag's, with the run's name); by "
        "default they are dropped",
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
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA weights apart (slower; for checks)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch [default: 64]")
    p.set_defaults(run_command=run)


def _sharded(args) -> bool:
    """Sharded prediction: --output is a folder (exists as one, or has no extension) and --input is given."""
    if args.output is None or args.input is None or args.format == "brat":
        return False
    return args.output.is_dir() or not args.output.suffix


def run(args) -> None:
    from ..documents import output_format
    from ..labels import LabelSet
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
        from .shards import ShardOptions, local_engine, predict_shards

        engine = local_engine
        if args.engine == "ray":
            from .ray import ray_engine

            engine = ray_engine(args.actors, args.ray_address)
        options = ShardOptions(args.format, args.input_format, args.keep_annotations, Path(args.run).name)
        print(json.dumps(predict_shards(spec, args.input, args.output, engine, options=options)))
        return
    if args.engine != "local":
        raise ValueError("--engine ray tags shards: give --input (a folder or glob) and --output FOLDER")
    if args.output is not None:
        output_format(args.output, args.format)  # an unknown format stops here, before the model loads
    if args.format and args.output is None:
        raise ValueError("--format names the format of --output; give --output")
    from .formats import predict, read_input

    source = ("documents", iter([_one(args.text)])) if args.text is not None else None
    source = source or read_input(Path(args.input), args.input_format)
    tagger = spec.load()
    n = predict(
        tagger, source, args.output, args.format, words=args.words, keep=args.keep_annotations, run=Path(args.run).name
    )
    if args.output is not None:
        print(f"{n} documents -> {args.output}", file=sys.stderr)


def _one(text: str):
    from ..documents import Document

    return Document.plain("", text)
