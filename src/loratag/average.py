"""`loratag average`: several runs' adapters (seeds, or epochs of one run) as one adapter whose weight update is the
mean of theirs, exactly, so it costs nothing at inference (a model soup: Wortsman et al. 2022).

The mean of K LoRA updates ``s_k B_k A_k`` is itself a LoRA update of rank ``sum(r_k)``: A stacks the A matrices,
B sets the B matrices side by side, each scaled by ``s_k / K``, and the scaling becomes 1 (``lora_alpha = r``).
So the result is a plain PEFT adapter that `PeftModel.from_pretrained`, predict, export and serve load as any
other; its trained biases and classifier head are the mean of the runs'. Written by hand: PEFT's
``add_weighted_adapter`` (cat) does the same inside one live model, for adapters loaded into it one by one, and
does not average the heads and biases that loratag's runs train.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from . import rundir
from .labels import TRANSITIONS, LabelSet, Transitions

log = logging.getLogger("loratag")

SETTINGS_THAT_MUST_AGREE = ("model", "lora.bias", "lora.target_modules", "lora.top_layers", "train.max_length",
                            "train.context", "train.case", "train.crf", "train.decode")  # fmt: skip


def _same(value):
    """A setting as compared between adapters: PEFT writes module names from a set, in no fixed order."""
    return sorted(value) if isinstance(value, list) else value


def _scaling(acfg: dict) -> float:
    r, alpha = acfg["r"], acfg["lora_alpha"]
    return alpha / r**0.5 if acfg.get("use_rslora") else alpha / r


def _setting(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
    return cfg


def average_adapters(adapters: list[Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """The mean of these PEFT adapter folders' updates: (tensors, adapter_config) of one adapter (see above)."""
    from safetensors.torch import load_file

    configs = [json.loads((a / rundir.ADAPTER_CONFIG).read_text()) for a in adapters]
    weights = [load_file(a / rundir.ADAPTER_WEIGHTS) for a in adapters]
    first, k = configs[0], len(adapters)
    for a, c, w in zip(adapters[1:], configs[1:], weights[1:]):
        for key in ("peft_type", "task_type", "target_modules", "bias", "modules_to_save"):
            if _same(c.get(key)) != _same(first.get(key)):
                raise ValueError(f"{a}: {key} is {c.get(key)!r}, {adapters[0]} has {first.get(key)!r}: not averaged")
        if set(w) != set(weights[0]):
            extra = sorted(set(w) ^ set(weights[0]))[:3]
            raise ValueError(f"{a}: its tensors differ from {adapters[0]}'s ({', '.join(extra)} ...): not averaged")
    if first.get("peft_type") != "LORA" or first.get("use_dora"):
        raise ValueError(f"{adapters[0]}: only plain LoRA adapters are averaged (not DoRA or other PEFT types)")
    scales = [_scaling(c) for c in configs]
    out: dict[str, torch.Tensor] = {}
    for name, t in weights[0].items():
        if ".lora_A." in name:
            out[name] = torch.cat([w[name].float() for w in weights], dim=0).contiguous()
        elif ".lora_B." in name:
            out[name] = torch.cat([w[name].float() * (s / k) for w, s in zip(weights, scales)], dim=1).contiguous()
        elif ".lora_embedding_A" in name or ".lora_embedding_B" in name:
            raise ValueError(f"{adapters[0]}: LoRA on embeddings is not averaged")
        elif t.is_floating_point():  # trained biases, the classifier head, --case's token-type table
            out[name] = (sum(w[name].float() for w in weights) / k).to(t.dtype)
        else:
            out[name] = t
    rank = sum(c["r"] for c in configs)
    config = {**first, "r": rank, "lora_alpha": float(rank), "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}}  # fmt: skip
    return out, config


def average_runs(runs: list[Path], out: Path, overwrite: bool = False, evaluate_splits=("validation", "test")) -> dict:
    """Write a run directory ``out`` whose adapter is the mean of the runs' kept adapters (``run/adapter``; a PEFT
    adapter folder is taken as it is), with the first run's settings and labels; then score it on the runs' data
    (validation and test, both decodings) into metrics.json, as training does. Returns the metrics."""
    from safetensors.torch import save_file

    if len(runs) < 2:
        raise ValueError("name at least two runs to average")
    folders = [r / rundir.ADAPTER if (r / rundir.ADAPTER / rundir.ADAPTER_CONFIG).is_file() else r for r in runs]
    for r, f in zip(runs, folders):
        if not (f / rundir.ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{r}: not a run directory (no adapter/) nor a PEFT adapter folder")

    # a run's own settings and labels; for an adapter folder inside a run (RUN/last: its last epoch), the run's
    def home(r: Path) -> Path:
        return r.parent if not (r / rundir.CONFIG).is_file() and (r.parent / rundir.CONFIG).is_file() else r

    homes = [home(r) for r in runs]
    cfgs = [rundir.read_json(h / rundir.CONFIG) if (h / rundir.CONFIG).is_file() else None for h in homes]
    labels = [(h / rundir.LABELS).read_text() if (h / rundir.LABELS).is_file() else None for h in homes]
    if cfgs[0] is None or labels[0] is None:
        raise ValueError(f"{runs[0]}: the first run must be a loratag run (its settings and labels are kept)")
    for r, c, lab in zip(runs[1:], cfgs[1:], labels[1:]):
        if c is None or lab is None:
            raise ValueError(f"{r}: not a loratag run (config.json and labels.json): its label order is unknown")
        if json.loads(lab) != json.loads(labels[0]):
            raise ValueError(f"{r}: its labels differ from {runs[0]}'s: heads of different labels are not averaged")
        for key in SETTINGS_THAT_MUST_AGREE:
            if _setting(c, key) != _setting(cfgs[0], key):
                raise ValueError(
                    f"{r}: {key} is {_setting(c, key)!r}, {runs[0]} has {_setting(cfgs[0], key)!r}: not averaged"
                )
    tensors, config = average_adapters(folders)
    rundir.prepare(out, resume=False, overwrite=overwrite)
    target = out / rundir.ADAPTER
    target.mkdir()
    save_file(tensors, target / rundir.ADAPTER_WEIGHTS, metadata={"format": "pt"})
    rundir.write_json(target / rundir.ADAPTER_CONFIG, config)
    names = LabelSet.from_mapping(json.loads(labels[0])).labels
    learned = [Transitions.read(f, names) for f in folders]
    if all(t is not None for t in learned):  # --crf runs: the mean of their scores, as their heads are averaged
        mean = [torch.tensor([getattr(t, k) for t in learned]).mean(0).tolist() for k in ("scores", "start", "end")]
        rundir.write_json(target / TRANSITIONS, Transitions(*mean).to_dict(names))
    (out / rundir.LABELS).write_text(labels[0])
    run_facts = {**cfgs[0].get("run", {}), "averaged_from": [str(r.resolve()) for r in runs], "lora_rank": config["r"]}
    rundir.write_json(out / rundir.CONFIG, {**cfgs[0], "run": run_facts})
    for extra in ("README.md",):
        if (runs[0] / extra).is_file():
            shutil.copy2(runs[0] / extra, out / extra)
    metrics = {"averaged_from": run_facts["averaged_from"], "lora_rank": config["r"], **_score(out, evaluate_splits)}
    rundir.write_json(out / rundir.METRICS, metrics)  # written last: a server's --watch serves the run from here
    return metrics


def _score(out: Path, splits) -> dict:
    """Validation and test scores of the averaged run, on its runs' data (both decodings from one forward pass)."""
    from .config import DECODINGS, Config
    from .corpus import load
    from .evaluation import evaluate
    from .tagger import Tagger

    cfg = Config.load(out / rundir.CONFIG)
    if not (cfg.data or cfg.corpus.train):
        return {}
    corpus = load(cfg.data, cfg.corpus, cfg.train.seed)
    tagger = Tagger.load(out, precision=cfg.train.precision, batch_size=cfg.train.eval_batch_size)
    scores = {}
    for split in splits:
        if split in corpus.splits:
            scores[split] = evaluate(tagger, corpus.splits[split], decodes=DECODINGS)
            log.info("%s: F1 %.4f untyped %.4f (%s)", split, scores[split]["f1"], scores[split]["untyped"]["f1"],
                     tagger.decode)  # fmt: skip
    return scores
