"""The `loratag` command: a thin shell over the library. Each command declares its flags beside its function
(train/cli.py, predict/cli.py, serve/cli.py, commands.py); this module puts them together, and only it turns
errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from . import __version__, commands
from .cliargs import EXAMPLES
from .predict import cli as predict_cli
from .serve import cli as serve_cli
from .train import cli as train_cli

# in the order `loratag --help` lists them
REGISTER = (
    train_cli.register,
    commands.add_evaluate,
    predict_cli.register,
    commands.add_params,
    commands.add_export,
    serve_cli.register,
    commands.add_push,
    commands.add_plot,
    commands.add_average,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loratag",
        description="Fine-tune transformer encoders with LoRA for token classification (NER), evaluate, predict.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"loratag {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTER:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # when the command began, for a --time-budget: the heavy imports (torch, transformers) come after, inside the
    # command, and count. Not the process's start in /proc: `pip install -e . && loratag train ...` (the README's
    # main job) runs loratag in the shell's own process (bash execs a list's last command), dated before the install,
    # whose seconds were counted as loratag's start-up; nor, for main() called in a long-lived process, its start
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    args.started = started
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("loratag").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft 0.21
    try:
        import transformers

        transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
        if not sys.stderr.isatty():  # its "Loading weights" bars redraw with carriage returns: noise in a log
            transformers.utils.logging.disable_progress_bar()
        args.run_command(args)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError, PermissionError) as e:
        print(f"loratag {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue with: loratag train --out RUN --resume)" if args.command == "train" else ""
        print(f"loratag {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0
