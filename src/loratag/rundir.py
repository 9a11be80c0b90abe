"""The run directory, the contract between training and everything that reads a run: its file names, preparing it,
the one atomic write, checkpoints, and where an adapter's labels, base model and decoding come from.

```
RUN/  config.json  labels.json  adapter/  last/  metrics.json  README.md  curves.png  train.log  [checkpoint.pt]
```
(``adapter/`` and ``last/``: PEFT's files, and ``transitions.json`` where the run trained a CRF)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from .config import FORMAT, Config
from .labels import LabelSet, Transitions

CONFIG = "config.json"  # the settings (Config) and, under "run", facts about the run
LABELS = "labels.json"  # label -> id of the classifier head
ADAPTER = "adapter"  # the best epoch's PEFT adapter (by validation F1)
LAST = "last"  # the last epoch's adapter
METRICS = "metrics.json"  # every epoch's scores, the kept epoch, test scores; written last
CHECKPOINT = "checkpoint.pt"  # while training: what resume continues from (tensors and plain values only)
CARD = "README.md"  # the model card
CURVES = "curves.png"  # validation F1 against wall minutes
LOG = "train.log"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---- writing: a kill at any moment leaves the old file or the new one, never a part --------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_stream(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file, synced, then renamed over ``path`` (and the rename
    synced) when the block ends without an error; removed when it raises, so ``path`` is never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_stream``)."""
    with atomic_stream(path) as f:
        f.write(data)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_line(path: Path, line: str) -> None:
    """Append one line and sync it. A kill while appending can leave a torn last line: it is ended first, so the
    new line stands on its own (readers skip a torn line)."""
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + line + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_adapter(model, target: Path, extra: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` into a temporary folder (with ``extra``: file name -> JSON; its files synced), then swap
    it in. Only a rename separates the old folder from the new one; ``recover`` puts the old one back if a kill lands
    between the two renames."""
    from peft.tuners.lora import Embedding

    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    # PEFT's "auto" asks the Hub for the base's config.json at every save, to learn whether the vocabulary grew: a
    # network call inside the training loop (a firewalled machine waits out its timeout, every epoch). loratag
    # knows: the embeddings are saved only where LoRA adapts them
    embeddings = any(isinstance(m, Embedding) for m in model.modules())
    model.save_pretrained(tmp, save_embedding_layers="auto" if embeddings else False)
    for name, data in (extra or {}).items():
        (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(run: Path) -> None:
    """Undo an adapter swap interrupted between its two renames."""
    for old in run.glob("*.old"):
        target = old.with_name(old.name[: -len(".old")])
        if not target.exists():
            os.replace(old, target)


def prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready for a new run (empty, or emptied with ``overwrite``), or check that there is a run to
    resume in it (and undo a swap a kill interrupted)."""
    if resume:
        if not (out / CONFIG).is_file():
            raise FileNotFoundError(f"{out}: nothing to resume (no {CONFIG}); start it without --resume")
        if (out / METRICS).is_file() and not (out / CHECKPOINT).is_file():
            raise FileExistsError(f"{out}: this run has finished already ({METRICS}); nothing to resume")
        recover(out)
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it or --resume")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ---- checkpoints: tensors and plain values, never arbitrary pickles ------------------------------------------------


def save_checkpoint(run: Path, payload: dict) -> None:
    """``payload``: tensors, numbers, strings, lists and dicts only (what ``load_checkpoint`` accepts)."""
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    write_atomic(run / CHECKPOINT, buf.getvalue())


def load_checkpoint(run: Path) -> dict | None:
    """The checkpoint of a run still training (None where there is none). Loaded with ``weights_only``: a
    checkpoint is plain data, so one from someone else cannot run code here; anything else in it is refused."""
    import pickle

    import torch

    path = Path(run) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        first = next((x for x in lines if "Unsupported global" in x), lines[0]).split(". Please use")[0]
        raise ValueError(
            f"{path}: not a loratag checkpoint of tensors and plain values ({first}); it is not unpickled"
        ) from None
    if not isinstance(saved, dict) or "state" not in saved:
        raise ValueError(f"{path}: a checkpoint of an older loratag or another program; start the run again")
    return saved


# ---- what an adapter folder or run says about itself ---------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRef:
    """Everything predict, evaluate and serve need to know before loading an adapter: resolved once, here."""

    path: Path  # what was named: a run directory or a PEFT adapter folder
    adapter_dir: Path
    labels: LabelSet
    base: str  # the base model's name as given (hub id, local directory or alias)
    user_base: bool  # the user named the base (--base), so a failure to load it is theirs to fix
    decode: str  # the run's --decode; argmax for plain PEFT adapters
    max_length: int | None = None
    context: int = 0  # the run's --context: sub-tokens of document context each side; 0 for plain PEFT adapters
    case: bool = False  # the run's --case: token types carry each word's case
    bias: str = "none"
    peft_type: str = "LORA"
    config: Config | None = None  # the run's settings; None for a plain PEFT adapter
    metrics: dict = field(default_factory=dict)  # the run's test precision, recall and F1, where it has them


def locate(path: Path) -> tuple[Path, Config | None]:
    """The adapter folder of a loratag run directory (with the run's Config) or of a plain PEFT adapter."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run or adapter directory not found: {path}")
    cfg, adapter = None, path
    if (path / CONFIG).is_file() and read_json(path / CONFIG).get("format") == FORMAT:
        cfg, adapter = Config.load(path / CONFIG), path / ADAPTER
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG}; expected a loratag run or a PEFT adapter")
    return adapter, cfg


def known_labels(path: Path) -> LabelSet | None:
    """The label order a run or adapter carries (run labels.json, adapter config.json); None if it says none."""
    from .modeling import adapter_labels

    adapter, cfg = locate(path)
    return adapter_labels(adapter, Path(path) if cfg is not None else None)


def _trains_token_types(acfg: dict, path: Path) -> bool:
    """A plain PEFT adapter folder that trains BERT's token-type table whole was trained as ``--case`` trains (no
    loratag setting is at hand to say so): read it the same way, and say so."""
    from .modeling import CASE_MODULE

    if not any(str(m).split(".")[-1] == CASE_MODULE for m in acfg.get("modules_to_save") or ()):
        return False
    logging.getLogger("loratag").info(
        "%s: the adapter trains the token-type table (modules_to_save), as loratag --case does: each word's case "
        "is read as its token type", path,
    )  # fmt: skip
    return True


def resolve_adapter(path: Path, labels: LabelSet | None = None, base: str | None = None) -> AdapterRef:
    """What a run or a plain PEFT adapter needs to load, with one rule for everyone. Labels: the adapter's own
    (the run's labels.json, or a config.json with id2label beside the adapter); ``labels`` (``--labels``) only
    where it carries none, and an error where the two disagree, because the order of the classifier head is
    not a matter of preference. Base: ``base`` (``--base``), else the run's model, else the one the adapter names."""
    from .modeling import adapter_base, adapter_labels, head_size

    path = Path(path)
    adapter, cfg = locate(path)
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    own = adapter_labels(adapter, path if cfg is not None else None)
    if own is not None and labels is not None and own != labels:
        raise ValueError(
            f"{path}: --labels gives {list(labels.labels)}, but the adapter carries its own label order "
            f"{list(own.labels)}; drop --labels (it is for adapters saved without labels)"
        )
    labels = own or labels
    if labels is None:
        raise ValueError(
            f"{path}: the adapter does not say its label order (no labels.json, no config.json with id2label); "
            'pass it with --labels label.json ({"O": 0, "B-X": 1, ...}, the ids of the classifier head)'
        )
    n = head_size(adapter)
    if n != len(labels):
        raise ValueError(f"{path}: the classifier head has {n} classes but the label set has {len(labels)}")
    learned = Transitions.read(adapter, labels.labels)
    if learned is not None:  # a --crf run: constrained decoding adds what its CRF learned
        labels = replace(labels, transitions=learned)
    acfg = read_json(adapter / ADAPTER_CONFIG)
    metrics = {}
    if cfg is not None and (path / METRICS).is_file():
        test = read_json(path / METRICS).get("test")
        metrics = {k: test[k] for k in ("precision", "recall", "f1")} if test else {}
        if test and "untyped" in test:  # boundary-only F1 beside the typed one, as every score loratag prints
            metrics["untyped_f1"] = test["untyped"]["f1"]
    # a run records what --case resolved to; runs from before --case have none: trained without
    case = bool(cfg.train.case) if cfg is not None else _trains_token_types(acfg, path)
    return AdapterRef(
        path=path,
        adapter_dir=adapter,
        labels=labels,
        base=base or (cfg.model if cfg is not None else adapter_base(adapter)),
        user_base=base is not None,
        decode=cfg.train.decode if cfg is not None else "argmax",
        max_length=cfg.train.max_length if cfg is not None else None,
        context=cfg.train.context if cfg is not None else 0,
        case=case,
        bias=acfg.get("bias", "none"),
        peft_type=acfg.get("peft_type", "LORA"),
        config=cfg,
        metrics=metrics,
    )
