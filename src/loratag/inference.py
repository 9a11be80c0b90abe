"""The one prediction path: evaluate, predict and (later) serve all call Tagger."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import FORMAT, Config
from .encoding import batches, collate, encode
from .labels import LabelSet, repair_iob2
from .modeling import (
    adapter_labels,
    autocast,
    device_of,
    load_adapter,
    load_tokenizer,
    model_max_length,
    resolve_model,
    resolve_precision,
)

log = logging.getLogger(__name__)

# GENIA/JNLPBA-style word split (the rules of the BioNLP2004 README): brackets, commas, semicolons,
# colons, %, =, <, >, &, ?, ! and double quotes are words of their own; hyphens, slashes, plus signs and
# inner periods stay inside words (IL-2, C/EBP, CD4+, PU.1). A word-final period is split off when it
# ends the text or is followed by a space and a capital, a digit or a bracket.
_PUNCT = r"()\[\]{},;:%=<>&?!\""
_WORD = re.compile(rf"[{_PUNCT}]|[^\s{_PUNCT}]+")
_FINAL_PERIOD = re.compile(r"\.(?=\s+[A-Z0-9(\[]|\s*$)")


@dataclass(frozen=True)
class Word:
    text: str
    start: int
    end: int


def split_words(text: str) -> list[Word]:
    """Words with character offsets into ``text`` (``text[w.start:w.end] == w.text``).

    >>> [w.text for w in split_words("IL-2 (and NF-kappa B) binds DNA.")]
    ['IL-2', '(', 'and', 'NF-kappa', 'B', ')', 'binds', 'DNA', '.']
    """
    words = []
    for m in _WORD.finditer(text):
        s, e = m.start(), m.end()
        tail = _FINAL_PERIOD.match(text, e - 1) if e - s > 1 and text[e - 1] == "." else None
        if tail:
            words += [Word(text[s : e - 1], s, e - 1), Word(".", e - 1, e)]
        else:
            words.append(Word(m.group(), s, e))
    return words


class Tagger:
    """A token classifier with its tokenizer and labels; predicts one label per word."""

    def __init__(
        self,
        model,
        tokenizer,
        labels: LabelSet,
        max_length: int | None = None,
        precision: str = "auto",
        batch_size: int = 64,
        device: str | torch.device | None = None,
    ):
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_length = max_length or model_max_length(tokenizer, model.config)
        self.dtype = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.last_windowed = 0

    @classmethod
    def load(cls, path: str | Path, labels: LabelSet | None = None, device: str | None = None, **kw) -> Tagger:
        """From a loratag run directory or a plain PEFT adapter directory (``labels``: for adapters saved
        without a label list, e.g. by the PEFT guide's code)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"run or adapter directory not found: {path}")
        base = None
        cfg_path = path / "config.json"
        if cfg_path.is_file() and json.loads(cfg_path.read_text()).get("format") == FORMAT:
            cfg = Config.load(cfg_path)
            base = cfg.model
            kw.setdefault("max_length", cfg.train.max_length)
            adapter = path / "adapter"
        else:
            adapter = path
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path}: no adapter_config.json; expected a loratag run or a PEFT adapter")
        labels = labels or adapter_labels(adapter)
        if labels is None:
            raise ValueError(f"{path}: no labels.json beside the adapter; pass the label set (--labels label.json)")
        model = load_adapter(adapter, labels, base).to(device_of(device))
        tokenizer = load_tokenizer(resolve_model(base or model.peft_config["default"].base_model_name_or_path))
        return cls(model, tokenizer, labels, device=device_of(device), **kw)

    @torch.inference_mode()
    def word_logits(self, sentences: Sequence[Sequence[str]], progress: bool = False) -> list[torch.Tensor]:
        """Per sentence, a float32 ``(words, labels)`` tensor: each word's logits at its first sub-token, from
        the window where the word is most central."""
        windows, self.last_windowed = encode(self.tokenizer, sentences, self.max_length)
        out = [torch.zeros(len(s), len(self.labels)) for s in sentences]
        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id or 0
        order = batches([len(w.input_ids) for w in windows], self.batch_size)
        bar = tqdm(total=len(sentences), desc="predict", unit="sent", disable=not progress, leave=False)
        try:
            for idx in order:
                group = [windows[i] for i in idx]
                batch = {k: v.to(self.device) for k, v in collate(group, pad).items()}
                with autocast(self.device, self.dtype):
                    logits = self.model(**batch).logits.float().cpu()
                for row, w in enumerate(group):
                    prev = None
                    for pos, wid in enumerate(w.word_ids):
                        if wid is not None and wid != prev and w.first <= wid < w.last:
                            out[w.sentence][wid] = logits[row, pos]
                        prev = wid
                bar.update(sum(1 for w in group if w.last == len(sentences[w.sentence])))
        finally:
            bar.close()
            self.model.train(was_training)
        return out

    def predict_words(self, sentences: Sequence[Sequence[str]], progress: bool = False) -> list[list[str]]:
        """IOB2 labels for pre-split words (an I-X that opens an entity is read as B-X, as conlleval does)."""
        names = self.labels.labels
        out = []
        for logits in self.word_logits(sentences, progress):
            out.append(repair_iob2([names[i] for i in logits.argmax(-1).tolist()])[0] if len(logits) else [])
        return out

    def predict_text(self, text: str) -> list[tuple[Word, str]]:
        """Each word of a raw text with its label."""
        words = split_words(text)
        if not words:
            return []
        labels = self.predict_words([[w.text for w in words]])[0]
        return list(zip(words, labels))
