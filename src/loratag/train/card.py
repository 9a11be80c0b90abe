"""The run's README.md: a Hub-style model card with the measured metrics."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, is_local_path
from ..crf import NOTE as CRF_NOTE
from ..encoding import CASE_NOTE
from ..labels import LabelSet
from ..modeling import hub_id
from ..plot import plot_runs
from ..rundir import CARD, CURVES, write_atomic


def data_name(data: str) -> str:
    """How the card names the training data: a Hub dataset by its id, a local folder by its name only (a path on
    the trainer's machine means nothing to a reader, and may say more than intended)."""
    return Path(data).name if is_local_path(data) else data


def _row(name: str, m: dict) -> str:
    support = f" | {m['support']}" if "support" in m else " | "
    return f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f}{support} |"


def _untyped(m: dict) -> str:
    return f"{m['untyped']['f1']:.4f}" if "untyped" in m else ""  # runs from before untyped scores: blank


def write_card(out: Path, cfg: Config, labels: LabelSet, metrics: dict, run: dict) -> None:
    test = metrics.get("test")
    base = hub_id(cfg.model)
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "pipeline_tag: token-classification",
        "tags: [loratag, lora, token-classification, ner]",
        "---",
        "",
        f"# LoRA token classifier on {base}",
        "",
        f"Trained with loratag on `{data_name(cfg.data or cfg.corpus.train or '')}`: LoRA r={cfg.lora.r}, "
        f"alpha={cfg.lora.alpha}, "
        f"dropout={cfg.lora.dropout}, bias={cfg.lora.bias}, {_where(cfg)}, lr={cfg.train.lr}, "
        f"{_length(cfg, metrics)}. "
        f"Trainable parameters: {run.get('trainable_params', '?'):,}. Decoding: {cfg.train.decode}.",
        "",
        f"Labels: {', '.join(labels.labels)}",
        "",
        f"Best epoch by validation F1: {metrics['best_epoch']} (F1 {metrics['best_validation_f1']:.4f}).",
        f"Scores: seqeval, mode {metrics['mode']}.",
        "",
    ]
    if test:
        lines += [
            "## Test set",
            "",
            "| entity | precision | recall | F1 | support |",
            "| --- | --- | --- | --- | --- |",
            _row("**overall**", test),
            *([_row("untyped (boundaries only)", test["untyped"])] if "untyped" in test else []),
            *[_row(k, v) for k, v in sorted(test["per_type"].items())],
            "",
            f"Accuracy (per word): {test['accuracy']:.4f}",
            "",
        ]
    plot_runs([out], out / CURVES, title=f"{out.name}: validation F1 by wall-clock time")
    lines += [
        "## Validation F1 by epoch",
        "",
        f"![validation F1 against minutes since the run began]({CURVES})",
        "",
        "| epoch | steps | minutes (wall, evaluations included) | train loss | validation F1 | untyped F1 |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {e['epoch']} | {e.get('steps', '')} | {e.get('wall_seconds', e['train_seconds']) / 60:.1f} | "
            f"{e['train_loss']:.4f} | {e['validation']['f1']:.4f} | {_untyped(e['validation'])} |"
            for e in metrics["epochs"]
        ],
        "",
        "## Use",
        "",
        "```python",
        "from loratag.tagger import Tagger",
        f'tagger = Tagger.load("{out.name}")',
        'print(tagger.predict_text("IL-2 gene expression requires NF-kappa B."))',
        "```",
        "",
        f"or with plain PEFT: `PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained("
        f"'{base}', num_labels={len(labels)}), 'adapter')`.",
        "",
    ]
    if cfg.train.case:
        lines[-1:-1] = ["", f"Token types (--case): {CASE_NOTE}; loratag's Tagger passes them."]
    if cfg.train.crf:  # what a reader who decodes by argmax (plain PEFT, a pipeline) gets instead
        argmax = (metrics.get("test") or {}).get("by_decode", {}).get("argmax", {}).get("f1")
        said = f" (test F1 by argmax: {argmax:.4f})" if argmax is not None else ""
        lines[-1:-1] = ["", f"CRF (--crf): {CRF_NOTE}{said}."]
    write_atomic(out / CARD, "\n".join(lines).encode("utf-8"))


def _where(cfg: Config) -> str:
    targets = ",".join(cfg.lora.target_modules) if cfg.lora.target_modules else "PEFT's default modules"
    top = cfg.lora.top_layers
    layers = (
        "every layer" if top is None else f"the top {top:g} layers" if top >= 1 else f"the top {top:.0%} of layers"
    )
    return f"on {targets} of {layers}"


def _length(cfg: Config, metrics: dict) -> str:
    ran = len(metrics["epochs"])
    if cfg.train.time_budget:
        return f"a {cfg.train.time_budget:g}-minute time budget ({ran} epoch(s), the last possibly partial)"
    return f"{ran} epochs"
