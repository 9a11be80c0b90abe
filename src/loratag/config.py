"""One frozen configuration shared by the CLI, the library and the saved run (stdlib only)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT = "loratag-run.v1"
BIASES = ("none", "all", "lora_only")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODINGS = ("argmax", "constrained")  # prediction: each word's best label, or the best valid IOB2 sequence
HEAD_INITS = ("random", "labels")


def is_local_path(name: str) -> bool:
    """Whether a model or data name (``--model``, ``--data``, an adapter's base) is a path on this machine rather
    than a Hub id: it exists here, or it is written as a path."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def _opt(default: Any, flag: str, help: str, **kw: Any) -> Any:
    """A dataclass field that knows its CLI flag and help text (the CLI is generated from these)."""
    return field(default=default, metadata={"flag": flag, "help": help, **kw})


@dataclass(frozen=True)
class LoraSettings:
    r: int = _opt(16, "--lora-r", "LoRA rank (guide: 16)")
    alpha: float = _opt(16.0, "--lora-alpha", "LoRA scaling numerator; the update is scaled by alpha/r (guide: 16)")
    dropout: float = _opt(
        0.0,
        "--lora-dropout",
        "dropout on the LoRA path (guide: 0.1). 0 by default: on a CPU each LoRA module's dropout mask costs more "
        "than its matmuls (docs/study.md)",
    )
    bias: str = _opt(
        "all",
        "--bias",
        "which biases train: none | all | lora_only (guide: all; 'none' scored lower in the study, docs/study.md). "
        "loratag serve keeps each adapter's biases apart, so adapters with trained biases share one base",
        choices=BIASES,
    )
    target_modules: tuple[str, ...] | None = _opt(
        ("all-linear",),
        "--target-modules",
        "comma-separated module names to adapt, e.g. query,value, or all-linear: every Linear layer of the "
        "encoder (attention and feed-forward), not the classifier head; none: PEFT's choice for the "
        "architecture, query+value on BERT/RoBERTa as in the guide",
    )
    top_layers: float | None = _opt(
        None,
        "--lora-top-layers",
        "adapt only the top layers of the encoder (LoRA and trained biases): a count (3: the top 3) or a fraction "
        "below 1 (0.5: the top half, rounded up; the same share of a 6-layer MiniLM and a 24-layer roberta-large). "
        "The layers below stay frozen, and in training their output is computed once per run and cached, so each "
        "epoch runs only the adapted layers. Default: every layer (which scored higher at equal time in the "
        "study, docs/study.md)",
    )
    rslora: bool = _opt(False, "--rslora", "rank-stabilised LoRA: scale the update by alpha/sqrt(r), not alpha/r")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"--lora-r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in BIASES:
            raise ValueError(f"--bias must be one of {', '.join(BIASES)}, got {self.bias!r}")
        if self.top_layers is not None:
            k = self.top_layers
            if k <= 0 or (k >= 1 and k != int(k)):
                raise ValueError(f"--lora-top-layers must be a count >= 1 or a fraction in (0, 1), got {k}")
            if k >= 1:
                object.__setattr__(self, "top_layers", int(k))
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", _split_csv(self.target_modules))
        elif self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def adapted_layers(self, n: int) -> int | None:
        """How many of an ``n``-layer encoder's top layers are adapted (None: all, no cache)."""
        if self.top_layers is None:
            return None
        k = self.top_layers if self.top_layers >= 1 else math.ceil(self.top_layers * n)
        if k > n:
            raise ValueError(f"--lora-top-layers {k}: the encoder has only {n} layers")
        return int(k)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = _opt(2e-3, "--lr", "peak learning rate of AdamW, linear decay to 0 after warmup (guide: 1e-3)")
    batch_size: int = _opt(16, "--batch-size", "sentences per training batch (guide: 16)")
    batch_tokens: int | None = _opt(
        None, "--batch-tokens", "instead of --batch-size: at most this many padded sub-word tokens per batch"
    )
    epochs: int | None = _opt(
        None,
        "--epochs",
        "passes over the training data; the learning rate reaches 0 at the end (guide: 10). Default: 4, or more "
        "for a small corpus, enough for --min-steps optimizer steps (2,000 sentences at batch 16: 6); on the "
        "study's corpora these scored higher validation F1 than 2 (docs/study.md)",
    )
    min_steps: int = _opt(
        750,
        "--min-steps",
        "without --epochs: at least this many optimizer steps, so that a small corpus is not under-trained (the "
        "log says how many epochs that makes); a given --epochs is trained exactly",
    )
    weight_decay: float = _opt(0.01, "--weight-decay", "AdamW weight decay (guide: 0.01)")
    warmup_ratio: float = _opt(0.06, "--warmup-ratio", "share of the steps with a linear warmup (guide: 0)")
    max_length: int | None = _opt(
        None,
        "--max-length",
        "longest input in sub-word tokens, special tokens included; longer sentences are split into "
        "overlapping windows, never truncated (default: the model's limit)",
    )
    context: int = _opt(
        0,
        "--context",
        "sub-tokens of document context on each side of a sentence (FLERT): each sentence is read with the "
        "sentences around it in its document (from documents.tsv, -DOCSTART-, or documents read whole), labels "
        "and loss on the sentence only; evaluate, predict and serve read it the same way. Costs time: a sentence "
        "of S sub-tokens becomes up to S + 2N (0: each sentence alone, as the guide)",
    )
    case: bool | None = _opt(
        None,
        "--case",
        "true | false | auto: each sub-token's token type says if its word has an upper-case letter (IL-2 / il-2), "
        "the token-type table trains with the adapter; evaluate, predict, serve read it so, a transformers pipeline "
        "does not (export says so). auto: on for a base that lower-cases and has 2 token types (MiniLM), else off",
        auto=True,
    )
    seed: int = _opt(42, "--seed", "seed for initialisation, shuffling and dropout")
    max_train_sentences: int | None = _opt(
        None, "--max-train-sentences", "train on the first N training sentences only (quick runs)"
    )
    precision: str = _opt(
        "auto",
        "--precision",
        "auto | fp32 | bf16 | fp16: autocast dtype of the forward pass; auto picks bf16 on CPUs with "
        "AMX/AVX-512-BF16 and on CUDA GPUs that support it, else fp32. LoRA weights and optimizer stay fp32",
        choices=PRECISIONS,
    )
    length_grouping: bool = _opt(
        True,
        "--length-grouping",
        "build batches from sentences of similar length (less padding), shuffled between epochs; "
        "'false' reproduces the guide's random batches",
    )
    eval_batch_size: int = _opt(64, "--eval-batch-size", "sentences per evaluation batch")
    lora_plus_ratio: float = _opt(
        1.0, "--lora-plus-ratio", "LoRA+: the learning rate of the LoRA B matrices is this times --lr (1: off)"
    )
    low_precision_weights: bool = _opt(
        True,
        "--low-precision-weights",
        "when autocasting to bf16 / fp16, store the frozen base weights in that dtype once instead of casting "
        "them at every step (the numbers are the same: autocast rounds them identically)",
    )
    head_init: str = _opt(
        "random",
        "--head-init",
        "random | labels: the head starts as the LDA of the base's features",
        choices=HEAD_INITS,
    )
    crf: bool | None = _opt(
        None,
        "--crf",
        "true | false | auto: train a linear-chain CRF over the words' logits with the adapter (transitions.json); "
        "constrained decoding adds its scores, a pipeline or plain PEFT does not. auto: on with --decode constrained",
        auto=True,
    )
    crf_lr: float = _opt(1e-2, "--crf-lr", "learning rate of the CRF's transition scores (--crf), same schedule")
    crf_token_loss: float = _opt(0.0, "--crf-token-loss", "with --crf: plus this times the words' cross-entropy")
    decode: str = _opt(
        "constrained",
        "--decode",
        "how validation picks the best epoch and how the run predicts by default: argmax (each word's best "
        "label; guide) or constrained (the best valid IOB2 sequence; higher validation F1 in the study, "
        "docs/study.md)",
        choices=DECODINGS,
    )
    time_budget: float | None = _opt(
        None,
        "--time-budget",
        "MINUTES for the whole run, start to exit, evaluations included: the run times its first steps and "
        "plans the steps, the learning-rate decay to zero and the evaluations to end inside it (--epochs is "
        "then ignored)",
    )
    checkpoint_minutes: float = _opt(
        10.0, "--checkpoint-minutes", "also checkpoint inside an epoch this often (0: only at epoch ends)"
    )

    def __post_init__(self) -> None:
        positive = {"--lr": self.lr, "--batch-size": self.batch_size, "--eval-batch-size": self.eval_batch_size}
        positive.update({"--crf-lr": self.crf_lr, "--lora-plus-ratio": self.lora_plus_ratio})
        for flag, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        at_least_0 = {"--min-steps": self.min_steps, "--weight-decay": self.weight_decay, "--context": self.context}
        at_least_0.update({"--checkpoint-minutes": self.checkpoint_minutes, "--crf-token-loss": self.crf_token_loss})
        for flag, value in at_least_0.items():
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if self.batch_tokens is not None and self.batch_tokens < 8:
            raise ValueError(f"--batch-tokens must be >= 8, got {self.batch_tokens}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"--max-length must be >= 8, got {self.max_length}")
        if self.max_train_sentences is not None and self.max_train_sentences < 1:
            raise ValueError(f"--max-train-sentences must be >= 1, got {self.max_train_sentences}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.decode not in DECODINGS:
            raise ValueError(f"--decode must be one of {', '.join(DECODINGS)}, got {self.decode!r}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"--head-init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.crf and self.decode != "constrained":
            raise ValueError("--crf decodes with the transitions it learns: use --decode constrained (the default)")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"--time-budget must be > 0 minutes, got {self.time_budget}")


INPUT_FORMATS = ("bioc-xml", "bioc-json", "pubtator", "brat", "labelstudio", "jsonl", "spacy", "tner", "conll")


@dataclass(frozen=True)
class CorpusSettings:
    """Where the splits come from besides --data, and how documents' mentions become IOB2 tags."""

    train: str | None = _opt(
        None,
        "--train",
        "training FILE instead of --data: BioC XML/JSON, PubTator, a brat folder, Label Studio JSON, Prodigy/doccano "
        "JSON Lines, spaCy .spacy, tner JSON Lines or CoNLL (.gz too), detected from name and content",
        metavar="FILE",
    )
    validation: str | None = _opt(
        None,
        "--validation",
        "validation FILE; without one (here or in --data) --validation-fraction of the training documents is set "
        "aside, whole documents, seeded by --seed; never taken from test",
        metavar="FILE",
    )
    test: str | None = _opt(None, "--test", "test FILE, scored once at the end", metavar="FILE")
    data_format: str | None = _opt(
        None, "--data-format", "the input format, where detection cannot tell", choices=INPUT_FORMATS, metavar="FORMAT"
    )
    validation_fraction: float = _opt(
        0.1,
        "--validation-fraction",
        "share of the training documents set aside for validation when none is given",
        metavar="FRACTION",
    )
    types: tuple[str, ...] | None = _opt(
        None,
        "--types",
        "comma-separated entity types to keep (after --type-map); the others are left out, counted",
        metavar="TYPE,...",
    )
    type_map: tuple[str, ...] | None = _opt(
        None,
        "--type-map",
        "comma-separated OLD=NEW renames or merges of entity types, e.g. SpecificDisease=Disease,DiseaseClass=Disease",
        metavar="OLD=NEW,...",
    )
    overlaps: str = _opt(
        "longest",
        "--overlaps",
        "of overlapping or nested mentions, keep the longest or the first (flat IOB2 holds one); the others are "
        "counted in the log and config.json",
        choices=("longest", "first"),
        metavar="{longest,first}",
    )
    discontinuous: str = _opt(
        "first",
        "--discontinuous",
        "a discontinuous mention (brat 0 5;10 15, BioC several locations) keeps its first fragment or its whole "
        "extent (the words between included); counted",
        choices=("first", "extent"),
        metavar="{first,extent}",
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation-fraction must be in (0, 1), got {self.validation_fraction}")
        for name in ("types", "type_map"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, _split_csv(value))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))
        for item in self.type_map or ():
            if "=" not in item:
                raise ValueError(f"--type-map {item!r}: expected OLD=NEW")
        for f in option_fields(CorpusSettings):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.metadata['flag']} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class Config:
    model: str = _opt("minilm", "--model", "hub name (roberta-large), local directory, or 'minilm' (offline default)")
    data: str = _opt(
        "",
        "--data",
        "hub dataset (tner/bionlp2004) or a local directory with train/validation (or dev/devel)/test files in any "
        "format --train reads (tner JSON Lines + label.json, CoNLL, BioC, PubTator, brat folders, ...)",
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)

    def __post_init__(self):
        if self.train.case is True and self.lora.top_layers is not None:
            raise ValueError("--case trains the token-type table, below the layers --lora-top-layers caches: drop one")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules) if self.lora.target_modules else None
        for key in ("types", "type_map"):
            d["corpus"][key] = list(d["corpus"][key]) if d["corpus"][key] else None
        return {"format": FORMAT, **d}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Config:
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"{source}: format {fmt!r} is not {FORMAT!r}")
        if "run" in d and "crf" not in (d.get("train") or {}):  # a run from before --crf: trained without one
            d["train"] = {**d["train"], "crf": False}
        d.pop("run", None)  # facts about a run (effective batch, windows) that are not settings
        try:
            lora = LoraSettings(**_known(LoraSettings, d.pop("lora", {}) or {}, source, "lora"))
            train = TrainConfig(**_known(TrainConfig, d.pop("train", {}) or {}, source, "train"))
            corpus = CorpusSettings(**_known(CorpusSettings, d.pop("corpus", {}) or {}, source, "corpus"))
            return cls(lora=lora, train=train, corpus=corpus, **_known(cls, d, source, "top level"))
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object with model, data, lora, train")
        return cls.from_dict(d, str(path))


SECTIONS = {"top level": None, "lora": LoraSettings, "train": TrainConfig, "corpus": CorpusSettings}  # key -> home


def _known(cls: type, d: dict[str, Any], source: str, section: str) -> dict[str, Any]:
    """``d``'s keys, all of which must be fields of ``cls``; an unknown one is an error that says where it belongs,
    if it belongs anywhere (a train key under lora would otherwise be lost without a word)."""
    names = {f.name for f in fields(cls) if cls is not Config or f.name not in ("lora", "train", "corpus")}
    if not isinstance(d, dict):
        raise ValueError(f"{source}: section {section!r} must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - names)
    if unknown:
        homes = []
        for key in unknown:
            home = [s for s, c in SECTIONS.items() if s != section and key in _field_names(c)]
            homes.append(f"{key!r} belongs in section {home[0]!r}" if home else f"{key!r} is no setting")
        raise ValueError(
            f"{source}: unknown key(s) in section {section!r}: {'; '.join(homes)}; "
            f"known here: {', '.join(sorted(names))}"
        )
    return dict(d)


def _field_names(cls: type | None) -> set[str]:
    return {f.name for f in fields(cls or Config)}  # None: the top level, Config's own settings and its sections


def _split_csv(text: str) -> tuple[str, ...] | None:
    return tuple(p.strip() for p in text.split(",") if p.strip()) or None


def option_fields(cls: type) -> list:
    """Fields of a config section that carry a CLI flag, for cli.py."""
    return [f for f in fields(cls) if "flag" in f.metadata]
