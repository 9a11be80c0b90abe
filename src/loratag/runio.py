"""Atomic writes for the run directory: a kill at any moment leaves the old file or the new one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_adapter(model, target: Path) -> None:
    """``save_pretrained`` into a temporary folder, then swap it in. Only a rename separates the old folder
    from the new one; ``recover`` puts the old one back if a kill lands between the two renames."""
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover(run: Path) -> None:
    """Undo a swap interrupted between its two renames."""
    for old in run.glob("*.old"):
        target = old.with_name(old.name[: -len(".old")])
        if not target.exists():
            os.replace(old, target)
