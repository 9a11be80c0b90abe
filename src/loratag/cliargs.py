"""What the commands' parsers share: the flags several commands take (declared once, as argparse parents), the
flags generated from the config dataclasses, and the examples. No torch here: `loratag --help` stays fast."""

from __future__ import annotations

import argparse
from dataclasses import Field, replace
from pathlib import Path
from typing import Any

from .config import DECODINGS, PRECISIONS, Config, option_fields

EXAMPLES = """examples:
  loratag train --data ../shared/data/bionlp2004 --out runs/bionlp          # offline default (MiniLM)
  loratag train --config configs/bionlp2004-guide.json --out runs/guide     # the PEFT guide, exactly
  loratag train --model roberta-large --data tner/bionlp2004 --bias all --out runs/rl
  loratag train --out runs/bionlp --resume                                   # after a crash or kill
  loratag train --train train.bioc.xml --test test.pubtator --type-map SpecificDisease=Disease --out runs/d
  loratag evaluate runs/bionlp --data ../shared/data/bionlp2004 --split test
  loratag predict runs/bionlp --text "IL-2 gene expression requires NF-kappa B."
  loratag predict runs/bionlp --input abstracts.jsonl --output entities.jsonl
  loratag predict runs/bionlp --input pubmed.bioc.xml.gz --output tagged.bioc.xml.gz   # any format in and out
  loratag predict runs/bionlp --input 'pubmed/*.jsonl.gz' --output tagged/       # sharded, resumable
  loratag predict runs/bionlp --input pubmed/ --output tagged/ --engine ray --ray-address auto
  loratag export runs/bionlp --out models/bionlp-merged                     # for transformers.pipeline
  loratag params --model roberta-large --bias all
"""


def _parent(*flags: str, **kw: Any) -> argparse.ArgumentParser:
    """An argparse parent (to give commands with ``parents=[...]``), with one flag if ``flags`` are given."""
    p = argparse.ArgumentParser(add_help=False)
    if flags:
        p.add_argument(*flags, **kw)
    return p


def adapter_flags() -> argparse.ArgumentParser:
    """--labels and --base: what a plain PEFT adapter may not say about itself (rundir.resolve_adapter)."""
    p = _parent()
    p.add_argument(
        "--labels",
        type=Path,
        help="label.json (label -> id of the classifier head) for adapters saved without labels; an adapter that "
        "carries its own labels (a run's labels.json, a config.json with id2label) needs none, and a --labels that "
        "contradicts them is an error",
    )
    p.add_argument(
        "--base",
        help="base model, instead of the one the run or adapter names: a hub name, a local directory, or minilm "
        "(for adapters whose base_model_name_or_path is another machine's path)",
    )
    return p


def device_flag() -> argparse.ArgumentParser:
    return _parent("--device", help="cpu, cuda, cuda:1 ... [default: cuda if available]")


def precision_flag() -> argparse.ArgumentParser:
    return _parent(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="dtype of the forward passes; auto: bf16 on CPUs with AMX or AVX-512-BF16 and on CUDA, else fp32; fp32 "
        "answers exactly alike in evaluate, predict and serve [default: auto]",
    )


def quantize_flag() -> argparse.ArgumentParser:
    """--quantize: one flag, one help, for evaluate, predict (sharded and Ray too) and serve."""
    return _parent(
        "--quantize",
        choices=("int8",),
        help="int8: the merged model exported to ONNX and run by ONNX Runtime with int8 matmuls (weights one scale "
        "per output channel, activations quantized per batch), fused attention and fp32 LayerNorm/GELU; CPU only, "
        "with --precision auto or fp32. docs/int8.md has its speed and F1 against fp32 [default: none]",
    )


def decode_flag() -> argparse.ArgumentParser:
    return _parent(
        "--decode",
        choices=DECODINGS,
        help="argmax: each word's most probable label (a stray I-X read as B-X, as conlleval does); constrained: the "
        "most probable valid IOB2 sequence (Viterbi: no I-X after O or after another type) [default: the run's "
        "own, chosen with --decode at training; argmax for plain PEFT adapters]",
    )


def _parse_value(f: Field, text: str) -> Any:
    kind = str(f.type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if text.lower() == "auto" and f.metadata.get("auto"):  # a field whose None means "loratag decides" (--case)
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


def add_config_flags(parser: argparse.ArgumentParser, cls: type, section: str) -> None:
    """A flag for each field of a config section, its help and choices from the field's metadata; given flags land
    in ``args`` as ``SECTION.FIELD`` (absent when not given), read back by ``given``."""
    group = parser.add_argument_group(cls.__name__)
    for f in option_fields(cls):

        def convert(text: str, f=f):
            return _parse_value(f, text)

        convert.__name__ = str(f.type).split(" ")[0]  # argparse names the type in "invalid int value: 'x'"
        group.add_argument(
            f.metadata["flag"],
            dest=f"{section}.{f.name}",
            type=convert,
            default=argparse.SUPPRESS,
            choices=f.metadata.get("choices"),
            # a bool whose None means "loratag decides" (auto=True) takes true, false or auto
            metavar=f.metadata.get("metavar", "{true,false,auto}" if f.metadata.get("auto") else f.name.upper()),
            help=f"{f.metadata['help']} [default: {f.default}]",
        )


def given(args: argparse.Namespace, cls: type, section: str) -> dict[str, Any]:
    """The fields of config section ``cls`` that the user gave as flags (see ``add_config_flags``)."""
    values = vars(args)
    return {f.name: values[f"{section}.{f.name}"] for f in option_fields(cls) if f"{section}.{f.name}" in values}


def with_overrides(cfg: Config, top: dict, lora: dict, train: dict, corpus: dict | None = None) -> Config:
    """A new Config with the flags given on the command line replaced (validation runs again)."""
    sections = {"lora": replace(cfg.lora, **lora), "train": replace(cfg.train, **train)}
    return replace(cfg, **top, **sections, corpus=replace(cfg.corpus, **(corpus or {})))
