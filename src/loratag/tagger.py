"""The one prediction path: evaluate, predict and serve all call Tagger (word logits, then decoding)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DECODINGS
from .crf import MODULE as CRF_MODULE
from .crf import NOTE as CRF_NOTE
from .encoding import CASE_NOTE, Context, collate, document_contexts, encode, inference_batches
from .labels import LabelSet, Transitions, repair_iob2, viterbi_many
from .modeling import load_adapter, load_tokenizer, model_max_length, resolve_model
from .precision import autocast, device_of, precision_name, resolve_precision
from .progress import bar as progress_bar
from .rundir import resolve_adapter
from .text import Entity, Word, entities, split_sentences


@dataclass
class TaggedDocument:
    text: str
    words: list[Word] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    entities: list[Entity] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "entities": [e.to_dict() for e in self.entities]}


class WordLogits(list):
    """Per sentence, a float32 ``(words, labels)`` tensor; and ``windowed``: how many sentences needed more than one
    window (evaluation reports it)."""

    def __init__(self, logits: list[torch.Tensor], windowed: int):
        super().__init__(logits)
        self.windowed = windowed


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
        decode: str = "argmax",
        context: int = 0,
        case: bool = False,
    ):
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_length = max_length or model_max_length(tokenizer, model.config)
        self.dtype = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        if decode not in DECODINGS:
            raise ValueError(f"--decode must be one of {', '.join(DECODINGS)}, got {decode!r}")
        self.decode = decode
        if context < 0:
            raise ValueError(f"--context must be >= 0 sub-tokens, got {context}")
        self.context, self.case = context, case  # the run's --context (sub-tokens each side) and --case (token types)

    @property
    def quantized(self) -> dict | None:
        """How an int8 model was made (engine, weight scales, ops), or None for a float model."""
        return getattr(self.model, "describe", None) or None

    @property
    def precision(self) -> str:
        """The dtype the forward passes run in: ``fp32``, ``bf16`` or ``fp16``."""
        return precision_name(self.dtype)

    @classmethod
    def load(
        cls,
        path: str | Path,
        labels: LabelSet | None = None,
        device: str | None = None,
        merge: bool = True,
        quantize: str | None = None,
        base: str | None = None,
        **kw,
    ) -> Tagger:
        """From a loratag run directory or a plain PEFT adapter directory (``rundir.resolve_adapter`` says which
        labels, base and decoding: ``labels`` and ``base`` as ``--labels`` and ``--base``). ``merge``: fold the LoRA
        weights (and the adapter's classifier head) into the base model, so inference runs a plain transformers
        model. ``quantize="int8"``: the merged model run by ONNX Runtime with int8 matmuls (CPU; see onnxrt.py)."""
        ref = resolve_adapter(Path(path), labels, base)
        kw.setdefault("max_length", ref.max_length)
        if kw.get("decode") is None:  # the decoding the run chose its epoch with; argmax for plain adapters
            kw["decode"] = ref.decode
        if kw["decode"] == "argmax" and ref.labels.transitions is not None:  # asked for; not what the run scored
            logging.getLogger("loratag").warning("%s: --decode argmax leaves its CRF out (its card: argmax F1)", path)
        kw.setdefault("context", ref.context)  # as the run was trained: the same context at inference
        kw.setdefault("case", ref.case)
        if quantize not in (None, "int8"):
            raise ValueError(f"--quantize must be int8, got {quantize!r}")
        if quantize == "int8":
            if kw.get("precision", "auto") not in ("auto", "fp32"):
                raise ValueError(
                    f"--quantize int8 runs int8 matmuls with fp32 around them; it cannot run with --precision "
                    f"{kw['precision']} (leave --precision out, or give fp32)"
                )
            if device_of(device).type != "cpu":
                raise ValueError("--quantize int8 runs on the CPU only; use --precision fp16/bf16 on GPUs")
            kw["precision"] = "fp32"
        model = load_adapter(ref.adapter_dir, ref.labels, ref.base, user_base=ref.user_base).to(device_of(device))
        tokenizer = load_tokenizer(resolve_model(ref.base))
        if merge or quantize:
            model = model.merge_and_unload().eval()
        if quantize == "int8":
            from .onnxrt import int8_model

            model = int8_model(model, tokenizer.pad_token_id or 0, types=kw["case"])
        return cls(model, tokenizer, ref.labels, device=device_of(device), **kw)

    def contexts(
        self, sentences: Sequence[Sequence[str]], docs: Sequence | None, context: Sequence[int] | None = None
    ) -> list[Context] | None:
        """Each sentence's document context as this tagger reads it (``docs``: a document key per sentence;
        ``context``: sub-tokens per side per sentence, else the tagger's)."""
        return document_contexts(sentences, docs, max(context, default=0) if context is not None else self.context)

    @torch.inference_mode()
    def word_logits(
        self,
        sentences: Sequence[Sequence[str]],
        progress: bool = False,
        adapters: Sequence[str] | None = None,
        contexts: Sequence[Context] | None = None,
        context: Sequence[int] | None = None,
        case: Sequence[bool] | None = None,
    ) -> WordLogits:
        """Per sentence, a float32 ``(words, labels)`` tensor: each word's logits at its first sub-token, from the
        window where it is most central (and how many sentences needed windows). ``adapters``: an adapter name per
        sentence, for a model holding several (``adapter_names``). ``contexts`` (``Tagger.contexts``): the words
        around each sentence in its document (``context``: sub-tokens per side per sentence; else the tagger's).
        ``case``: per sentence, whether its adapter reads case as token types (else the tagger's ``case``)."""
        size = self.context if context is None else list(context)
        cased = self.case if case is None else list(case)
        windows, windowed = encode(
            self.tokenizer, sentences, self.max_length, contexts=contexts, context=size, case=cased
        )
        # sized by the model's output (a server's stacked heads are padded to the widest adapter's)
        out: list = [None if len(s) else torch.zeros(0, len(self.labels)) for s in sentences]
        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id or 0
        order = inference_batches([len(w.input_ids) for w in windows], self.batch_size)
        bar = progress_bar(len(sentences), "predict", "sent", progress)
        try:
            for idx in order:
                group = [windows[i] for i in idx]
                batch = {k: v.to(self.device) for k, v in collate(group, pad).items()}
                if adapters is not None:
                    batch["adapter_names"] = [adapters[w.sentence] for w in group]
                with autocast(self.device, self.dtype):
                    logits = self.model(**batch).logits.float().cpu()
                for row, w in enumerate(group):
                    _read_out(out, w, logits[row], len(sentences[w.sentence]))
                bar.update(sum(1 for w in group if w.last == len(sentences[w.sentence])))
        finally:
            bar.close()
            self.model.train(was_training)
        return WordLogits(out, windowed)

    def tag_words(
        self,
        sentences: Sequence[Sequence[str]],
        progress: bool = False,
        adapters: Sequence[str] | None = None,
        label_sets: Sequence[LabelSet] | None = None,
        decodes: Sequence[str] | None = None,
        docs: Sequence | None = None,
        context: Sequence[int] | None = None,
        case: Sequence[bool] | None = None,
    ) -> list[tuple[list[str], list[float]]]:
        """Pre-split words -> per sentence, IOB2 labels and their probabilities (``adapters``, ``label_sets``,
        ``decodes``, ``context``, ``case``: one per sentence, when adapters differ; ``docs``: a document key per
        sentence, consecutive sentences with the same key being one document's, read in context)."""
        contexts = self.contexts(sentences, docs, context)
        logits = self.word_logits(sentences, progress, adapters, contexts, context, case)
        return self.decode_logits(logits, label_sets, decodes)

    def decode_logits(self, word_logits: list, label_sets: Sequence[LabelSet] | None = None, decode=None) -> list:
        """Labels and their probabilities from word logits (``decode_word_logits``), by the Tagger's labels (and
        their learned transitions) and decoding unless given (one, or one per sentence)."""
        sets = label_sets if label_sets is not None else [self.labels] * len(word_logits)
        names, learned = [x.labels for x in sets], [x.transitions for x in sets]
        return decode_word_logits(word_logits, names, decode or self.decode, learned)

    def tag_documents(
        self,
        texts: Sequence[str],
        progress: bool = False,
        adapters: Sequence[str] | None = None,
        label_sets: Sequence[LabelSet] | None = None,
        decodes: Sequence[str] | None = None,
        context: Sequence[int] | None = None,
        groups: Sequence | None = None,
        case: Sequence[bool] | None = None,
    ) -> list[TaggedDocument]:
        """Raw texts -> sentences -> words with offsets -> labels -> entities. All sentences of all texts are
        batched together (sorted by length); entity offsets point into each original text; each sentence is read
        with its text around it where the model was trained so (``--context``). ``adapters``, ``label_sets``,
        ``decodes``, ``context`` and ``case``: one per text, for a model holding several adapters. ``groups``: a key
        per text; consecutive texts with the same key (a document's passages) are read as one document's context."""
        docs, flat = [], []
        for d, text in enumerate(texts):
            docs.append(TaggedDocument(text))
            for sentence in split_sentences(text):
                flat.append((d, sentence))
        predictions = self.tag_words(
            [[w.text for w in s] for _, s in flat],
            progress,
            None if adapters is None else [adapters[d] for d, _ in flat],
            None if label_sets is None else [label_sets[d] for d, _ in flat],
            None if decodes is None else [decodes[d] for d, _ in flat],
            [d for d, _ in flat] if groups is None else [groups[d] for d, _ in flat],
            None if context is None else [context[d] for d, _ in flat],
            None if case is None else [case[d] for d, _ in flat],
        )
        for (d, sentence), (labels, scores) in zip(flat, predictions):
            doc = docs[d]
            doc.entities += entities(doc.text, sentence, labels, scores)
            doc.words += sentence
            doc.labels += labels
            doc.scores += scores
        return docs

    def predict_text(self, text: str) -> TaggedDocument:
        """One raw text: its words, their labels and scores, and its entities."""
        return self.tag_documents([text])[0]


def _read_out(out: list, w, logits: torch.Tensor, n_words: int) -> None:
    """Window ``w``'s logits (one row of a batch) at the first sub-token of each word it owns, into its sentence's."""
    positions, words, prev = [], [], None
    for pos, wid in enumerate(w.word_ids):
        if wid is not None and wid != prev and w.first <= wid < w.last:
            positions.append(pos)
            words.append(wid)
        prev = wid
    if out[w.sentence] is None:
        out[w.sentence] = torch.zeros(n_words, logits.shape[-1])
    out[w.sentence][words] = logits[positions]


def decode_word_logits(
    word_logits: list[torch.Tensor],
    names: list[Sequence[str]],
    decode: str | Sequence[str],
    transitions: Sequence[Transitions | None] | None = None,
) -> list[tuple[list[str], list[float]]]:
    """Labels and their probabilities from word logits, ``names[i]`` being sentence i's labels; ``decode`` (one, or
    one per sentence): "argmax" (each word's best label, a stray I-X read as B-X as conlleval does) or "constrained"
    (the most probable valid IOB2 sequence: Viterbi, no I-X after O or after another type, plus the learned
    ``transitions[i]`` of a --crf adapter). A word's probability is its softmax, whichever label decoding chose."""
    per_sentence = [decode] * len(word_logits) if isinstance(decode, str) else list(decode)
    learned = list(transitions) if transitions is not None else [None] * len(word_logits)
    logps = [logits[:, : len(names[i])].log_softmax(-1) for i, logits in enumerate(word_logits)]  # own labels
    ids: list = [logp.argmax(-1) for logp in logps]
    groups: dict[tuple, list[int]] = {}
    for i, how in enumerate(per_sentence):
        if how == "constrained" and len(logps[i]):
            groups.setdefault((tuple(names[i]), learned[i]), []).append(i)
    for (labels, scores), group in groups.items():
        for i, path in zip(group, viterbi_many([logps[i].numpy() for i in group], labels, transitions=scores)):
            ids[i] = torch.tensor(path)
    out = []
    for i, logp in enumerate(logps):
        if not len(logp):
            out.append(([], []))
            continue
        probs = logp.gather(1, ids[i][:, None])[:, 0].exp()
        out.append((repair_iob2([names[i][j] for j in ids[i].tolist()])[0], [round(p, 4) for p in probs.tolist()]))
    return out


def export_transformers(tagger: Tagger, out: str | Path) -> None:
    """A standalone transformers model: LoRA merged, the adapter's classifier head, id2label/label2id."""
    model = tagger.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if tagger.quantized:
        raise ValueError("an int8 model cannot be saved for transformers; use export --onnx --quantize int8")
    model.config.id2label, model.config.label2id = tagger.labels.id2label, tagger.labels.label2id
    if tagger.case:  # said in the folder (config.json) and now: a pipeline would read every word lower-cased
        model.config.loratag_token_types = CASE_NOTE
        logging.getLogger("loratag").warning("export: %s", CASE_NOTE)
    if hasattr(model, CRF_MODULE):  # the model of a run just trained: its CRF is not part of the transformers model
        delattr(model, CRF_MODULE)
    if tagger.labels.transitions is not None:  # kept in config.json, and said: a pipeline decodes by argmax
        model.config.loratag_crf = {"note": CRF_NOTE, **tagger.labels.transitions.to_dict(tagger.labels.labels)}
        logging.getLogger("loratag").warning("export: %s", CRF_NOTE)
    model.save_pretrained(out)
    tagger.tokenizer.save_pretrained(out)
