"""Fixtures: tiny random models (BERT WordPiece and RoBERTa byte-level BPE) saved like hub models, and
tiny corpora. Nothing here touches the network."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import string
from pathlib import Path

import pytest
import torch

from loratag.config import Config, LoraSettings, TrainConfig

RESOURCES = Path(__file__).parent / "resources"
SHARED_DATA = Path(os.environ.get("LORATAG_BIONLP_DIR", Path(__file__).parents[2] / "shared/data/bionlp2004"))

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus_words() -> list[str]:
    words = set()
    for split in ("train", "validation", "test"):
        for line in (RESOURCES / "tiny" / f"{split}.json").read_text().splitlines():
            words.update(w.lower() for w in json.loads(line)["tokens"])
    return sorted(words)


AVX2 = (frozenset({"avx", "avx2", "fma"}), "AVX2")  # bf16 emulated: precision "auto" gives fp32
ZEN4 = (frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX512")  # torch says AVX512; the flag tells bf16
AMX = (frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), "AMX")


@pytest.fixture(autouse=True, scope="session")
def cpu_without_fast_bf16():
    """Every in-process test sees a CPU whose bf16 is emulated, so that ``--precision auto`` runs fp32 and exact
    comparisons hold on every machine (AVX2, AVX-512-BF16, AMX). Session-wide, so that module-scoped fixtures
    (servers, pools) built before any function fixture see it too. The bf16 path has its own tests
    (test_precision.py), which ask for bf16 explicitly or patch the detection to another kind."""
    from loratag import precision

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "cpu_features", lambda: AVX2)
        yield


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with a WordPiece vocabulary, saved as a model directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    pieces = [f"##{c}" for c in string.ascii_lowercase + string.digits + "-"]
    vocab = SPECIALS + list(string.ascii_lowercase + string.digits + string.punctuation) + pieces + _corpus_words()
    vocab = list(dict.fromkeys(vocab))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(d / "vocab.txt"), model_max_length=64).save_pretrained(
        d
    )  # v5: vocab=, not vocab_file=
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A 2-layer RoBERTa with a byte-level BPE tokenizer (needs add_prefix_space for split words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    d = tmp_path_factory.mktemp("tiny-roberta")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [" ".join(_corpus_words())] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = RobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=64,
    )
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=66,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    RobertaModel(cfg).save_pretrained(d)
    return d


def guide_lora(**kw) -> LoraSettings:
    """LoRA as the guide lays it out (every layer, PEFT's default modules, dropout 0.1), whatever loratag's defaults:
    the tests of saving, serving and resuming pin it; the defaults have their own tests."""
    return LoraSettings(**{"target_modules": None, "top_layers": None, "dropout": 0.1, "bias": "none", **kw})


def guide_train(**kw) -> TrainConfig:
    """Training settings of the tests: loratag's loop with the guide's schedule (no warmup), argmax decoding, no
    --case (the guide reads token types as the tokenizer gives them: all 0) and no --crf (a softmax head)."""
    return TrainConfig(**{"warmup_ratio": 0.0, "decode": "argmax", "epochs": 2, "case": False, "crf": False, **kw})


@pytest.fixture
def tiny_cfg(tiny_bert) -> Config:
    """Settings for a run of a few seconds on the tiny BERT and the tiny corpus."""
    return Config(
        model=str(tiny_bert),
        data=str(RESOURCES / "tiny"),
        lora=guide_lora(r=4, alpha=8, dropout=0.1, bias="none"),
        train=guide_train(lr=5e-3, batch_size=4, epochs=2, eval_batch_size=4, checkpoint_minutes=0, precision="fp32"),
    )


@pytest.fixture(scope="session")
def tiny_bert_nodrop(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT without dropout: training is then deterministic across process counts."""
    import shutil

    from transformers import BertConfig

    d = tmp_path_factory.mktemp("tiny-bert-nodrop")
    for p in tiny_bert.iterdir():
        shutil.copy2(p, d / p.name)
    cfg = BertConfig.from_pretrained(d)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    cfg.save_pretrained(d)
    return d


def tagging_cfg(base: Path) -> Config:
    """A tiny run trained long enough (40 epochs, bias all, fp32) to tag entities in the tiny corpus's sentences."""
    return Config(
        model=str(base),
        data=str(RESOURCES / "tiny"),
        lora=guide_lora(r=4, alpha=8, bias="all"),
        train=guide_train(lr=0.02, batch_size=4, epochs=40, checkpoint_minutes=0, precision="fp32"),
    )


@pytest.fixture(scope="session")
def tagging_run(tmp_path_factory, tiny_bert) -> Path:
    """``tagging_cfg`` on the tiny BERT, trained once for the modules that predict with it."""
    from loratag.train import train

    return train(tagging_cfg(tiny_bert), tmp_path_factory.mktemp("tagging-run") / "run", progress=False)


def guide_adapter(base_dir: Path, out: Path, seed: int = 0, base_name: str | None = None) -> Path:
    """An adapter as the PEFT guide's code trains and saves it: bias "all", no label file beside it, trained-looking
    weights (random LoRA matrices, every bias moved). ``base_name`` rewrites its base_model_name_or_path, as people
    do (a training path is machine-local)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForTokenClassification

    label2id = json.loads((RESOURCES / "tiny/label.json").read_text())
    torch.manual_seed(seed)
    base = AutoModelForTokenClassification.from_pretrained(
        base_dir, num_labels=len(label2id), id2label={v: k for k, v in label2id.items()}, label2id=label2id
    )
    lora = LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, lora_alpha=8, bias="all", init_lora_weights=False)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.5)  # so that losing or misplacing a bias would show
    model.save_pretrained(out)
    if base_name is not None:
        p = out / "adapter_config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "base_model_name_or_path": base_name}))
    return out
