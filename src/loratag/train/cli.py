"""`loratag train`: its flags (generated from the config dataclasses) and the command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cliargs import EXAMPLES, add_config_flags, device_flag, given, with_overrides
from ..config import Config, CorpusSettings, LoraSettings, TrainConfig, option_fields


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        parents=[device_flag()],
        help="train a LoRA adapter and write a run directory",
        description="Train a LoRA adapter; evaluate on validation every epoch, keep the best by F1, "
        "then score it on test. Settings come from the defaults, then --config, then the flags.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument("--config", type=Path, help="JSON config (e.g. configs/bionlp2004-guide.json); flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    for f in option_fields(Config):
        p.add_argument(f.metadata["flag"], dest=f"top.{f.name}", default=argparse.SUPPRESS, help=f.metadata["help"])
    add_config_flags(p, LoraSettings, "lora")
    add_config_flags(p, TrainConfig, "train")
    add_config_flags(p, CorpusSettings, "corpus")
    p.set_defaults(run_command=run)


def config_from_args(args) -> Config:
    """The defaults, then --config, then the flags given."""
    cfg = Config.load(args.config) if args.config else Config()
    top = {f.name: getattr(args, f"top.{f.name}") for f in option_fields(Config) if hasattr(args, f"top.{f.name}")}
    return with_overrides(
        cfg,
        top,
        given(args, LoraSettings, "lora"),
        given(args, TrainConfig, "train"),
        given(args, CorpusSettings, "corpus"),
    )


def run(args) -> None:
    from ..rundir import METRICS
    from .loop import train

    flags = [k for k in vars(args) if k.startswith(("top.", "lora.", "train.", "corpus."))]
    if args.resume and (flags or args.config):
        raise ValueError("--resume continues with the settings saved in the run's config.json; drop the other flags")
    cfg = Config() if args.resume else config_from_args(args)
    if not args.resume and not cfg.data and not cfg.corpus.train:
        raise ValueError("--data is required (a hub dataset name or a local folder), or --train FILE")
    out = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device, started=args.started)
    metrics = json.loads((out / METRICS).read_text())
    summary = {
        "run": str(out),
        "best_epoch": metrics["best_epoch"],
        "best_validation_f1": metrics["best_validation_f1"],
    }
    if "test" in metrics:
        summary["test"] = {k: metrics["test"][k] for k in ("precision", "recall", "f1", "accuracy")}
        if "untyped" in metrics["test"]:  # boundary-only F1 beside the typed one, as the log prints it
            summary["test"]["untyped_f1"] = metrics["test"]["untyped"]["f1"]
    print(json.dumps(summary))
