"""Sharing a run on the Hugging Face Hub (huggingface_hub imported only here)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from .config import is_local_path
from .rundir import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD, CONFIG, LABELS, METRICS, read_json

log = logging.getLogger(__name__)


def push(run: Path, repo_id: str, private: bool = False, api=None) -> str:
    """Upload the best adapter, labels, metrics and the model card of a run; returns the repository URL.

    The repository holds a plain PEFT adapter (adapter_config.json + adapter_model.safetensors, classifier head
    included), so ``PeftModel.from_pretrained(base, repo_id)`` loads it, as the PEFT guide does.
    """
    run = Path(run)
    if not (run / ADAPTER / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{run}: no {ADAPTER}/{ADAPTER_WEIGHTS}; is this a finished loratag run?")
    base = read_json(run / ADAPTER / ADAPTER_CONFIG).get("base_model_name_or_path") or ""
    if is_local_path(base):
        log.warning(
            "the adapter's base model is a local directory (%s): others cannot load it from the Hub repository; "
            "train on a Hub model (or the bundled minilm, recorded as its Hub id) to share a loadable adapter",
            base,
        )
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for p in (run / ADAPTER).iterdir():
            shutil.copy2(p, folder / p.name)
        for name in (LABELS, METRICS, CONFIG, CARD):
            if (run / name).is_file():
                shutil.copy2(run / name, folder / ("loratag_config.json" if name == CONFIG else name))
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="loratag adapter")
        except Exception as e:  # offline, no token, no rights: one clear line
            raise ConnectionError(
                f"could not push to the Hub repository {repo_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "check the network and `hf auth login`"
            ) from None
    return str(url)
