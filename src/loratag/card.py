"""The run's README.md: a Hub-style model card with the measured metrics."""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .labels import LabelSet


def _row(name: str, m: dict) -> str:
    support = f" | {m['support']}" if "support" in m else " | "
    return f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f}{support} |"


def write_card(out: Path, cfg: Config, labels: LabelSet, metrics: dict, run: dict) -> None:
    test = metrics.get("test")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {cfg.model}",
        "pipeline_tag: token-classification",
        "tags: [loratag, lora, token-classification, ner]",
        "---",
        "",
        f"# LoRA token classifier on {cfg.model}",
        "",
        f"Trained with loratag on `{cfg.data}`: LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, "
        f"dropout={cfg.lora.dropout}, bias={cfg.lora.bias}, lr={cfg.train.lr}, {cfg.train.epochs} epochs. "
        f"Trainable parameters: {run.get('trainable_params', '?'):,}.",
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
            *[_row(k, v) for k, v in sorted(test["per_type"].items())],
            "",
            f"Accuracy (per word): {test['accuracy']:.4f}",
            "",
        ]
    lines += [
        "## Validation F1 by epoch",
        "",
        " ".join(f"{e['validation']['f1']:.3f}" for e in metrics["epochs"]),
        "",
        "## Use",
        "",
        "```python",
        "from loratag.inference import Tagger",
        f'tagger = Tagger.load("{out.name}")',
        'print(tagger.predict_text("IL-2 gene expression requires NF-kappa B."))',
        "```",
        "",
        "or with plain PEFT: `PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(base, "
        "num_labels=...), 'adapter')`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
