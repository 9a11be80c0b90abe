"""Validation F1 against wall-clock minutes, one line per run (matplotlib), for `loratag plot` and the model card."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .rundir import CHECKPOINT, METRICS, load_checkpoint, read_json


def curve(run: Path) -> tuple[list[float], list[float], dict]:
    """``(minutes, validation F1, metrics)`` of a run after each evaluation: minutes since the run began, evaluations
    included (runs written before loratag recorded that: the summed training time). A run still training is read
    from its checkpoint."""
    run = Path(run)
    if (run / METRICS).is_file():
        metrics = read_json(run / METRICS)
        if "epochs" not in metrics:
            raise ValueError(f"{run}: made by loratag average, not trained: it has no validation curve to plot")
        history = metrics["epochs"]
    elif (run / CHECKPOINT).is_file():
        metrics, history = {}, load_checkpoint(run)["state"]["history"]  # plain data only, never a pickle
    else:
        raise FileNotFoundError(f"{run}: neither {METRICS} nor {CHECKPOINT}; not a loratag run directory")
    minutes, f1, spent = [], [], 0.0
    for e in history:
        spent += e["train_seconds"]
        minutes.append(e.get("wall_seconds", spent) / 60)
        f1.append(e["validation"]["f1"])
    return minutes, f1, metrics


def plot_runs(runs: Sequence[Path], out: Path, title: str | None = None, labels: Sequence[str] | None = None) -> Path:
    """Draw the runs' validation curves into ``out`` (PNG, SVG or PDF by its suffix); the best point of each run is
    marked, and its test F1 given in the legend where the run has one."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, run in enumerate(runs):
        minutes, f1, metrics = curve(run)
        name = labels[i] if labels else Path(run).name
        test = metrics.get("test", {}).get("f1")
        legend = f"{name} (test {test:.4f})" if test is not None else name
        (line,) = ax.plot(minutes, f1, marker="o", markersize=3, label=legend)
        if f1:
            best = max(range(len(f1)), key=f1.__getitem__)
            ax.plot([minutes[best]], [f1[best]], marker="*", markersize=11, color=line.get_color())
    ax.set_xlabel("minutes since the run began (training and evaluations)")
    ax.set_ylabel("validation F1")
    ax.set_title(title or "validation F1 by wall-clock time (star: the kept epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
