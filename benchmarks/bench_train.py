"""Training throughput: the PEFT guide's recipe (transformers Trainer + PEFT, fp32, batch 16) against
`loratag train` with its defaults, in one run, on the same machine, model and data. Prints one JSON line.

    python benchmarks/bench_train.py --data ../shared/data/bionlp2004 --train-sentences 1000 --epochs 1
    python benchmarks/bench_train.py --data ../shared/data/bionlp2004 --epochs 1             # full train set
    python benchmarks/bench_train.py --data ... --random-base bert-base --train-sentences 300   # larger base

Each arm runs alone in a fresh process (two PyTorch processes on two cores slow each other ~10x).
Tokens per second count real (non-padding) sub-word tokens of the training set, times epochs, divided by the
time spent in training steps (evaluation excluded for both arms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_facts, emit, matmul_peak, run_arm  # noqa: E402


def guide_arm(a) -> dict:
    """The guide's code, with a local copy of its data loading (the Hub dataset is a loading script).

    ``--arm full``: the same code without PEFT, every weight trained (the study's ceiling), with what a user would
    set for it: lr ``--full-lr``, 6% warmup, linear decay to 0, length-grouped batches, bf16 autocast where the
    CPU has native bf16 (loratag's own detection), evaluated every epoch and the best kept."""
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from loratag.data import load_corpus
    from loratag.modeling import load_tokenizer, resolve_model

    corpus = load_corpus(a.data)
    label_list = list(corpus.labels.labels)
    label2id = corpus.labels.label2id
    id2label = corpus.labels.id2label

    def rows(sentences):
        return Dataset.from_dict(
            {"tokens": [list(s.tokens) for s in sentences], "tags": [[label2id[t] for t in s.tags] for s in sentences]}
        )

    model_path = resolve_model(a.model)
    tokenizer = load_tokenizer(model_path)  # AutoTokenizer (+ add_prefix_space=True for RoBERTa), as the guide
    assert isinstance(tokenizer, type(AutoTokenizer.from_pretrained(model_path)))

    def tokenize_and_align_labels(examples):
        tokenized_inputs = tokenizer(examples["tokens"], truncation=True, is_split_into_words=True)
        labels = []
        for i, label in enumerate(examples["tags"]):
            word_ids = tokenized_inputs.word_ids(batch_index=i)
            previous_word_idx = None
            label_ids = []
            for word_idx in word_ids:
                if word_idx is None:
                    label_ids.append(-100)
                elif word_idx != previous_word_idx:
                    label_ids.append(label[word_idx])
                else:
                    label_ids.append(-100)
                previous_word_idx = word_idx
            labels.append(label_ids)
        tokenized_inputs["labels"] = labels
        return tokenized_inputs

    train = rows(corpus.splits["train"][: a.train_sentences]).map(
        tokenize_and_align_labels, batched=True, remove_columns=["tokens", "tags"]
    )
    val = rows(corpus.splits["validation"]).map(
        tokenize_and_align_labels, batched=True, remove_columns=["tokens", "tags"]
    )
    test = rows(corpus.splits["test"]).map(tokenize_and_align_labels, batched=True, remove_columns=["tokens", "tags"])
    train_tokens = sum(len(x) for x in train["input_ids"])

    def compute_metrics(p):
        predictions, labels = p
        predictions = np.argmax(predictions, axis=2)
        true_predictions = [
            [label_list[p] for (p, lab) in zip(pred, label) if lab != -100] for pred, label in zip(predictions, labels)
        ]
        true_labels = [
            [label_list[lab] for (p, lab) in zip(pred, label) if lab != -100]
            for pred, label in zip(predictions, labels)
        ]
        return {
            "precision": precision_score(true_labels, true_predictions),
            "recall": recall_score(true_labels, true_predictions),
            "f1": f1_score(true_labels, true_predictions),
            "accuracy": accuracy_score(true_labels, true_predictions),
        }

    torch.manual_seed(a.seed)
    model = AutoModelForTokenClassification.from_pretrained(
        model_path, num_labels=len(label_list), id2label=id2label, label2id=label2id
    )
    peft_config = LoraConfig(
        task_type=TaskType.TOKEN_CLS, inference_mode=False, r=16, lora_alpha=16, lora_dropout=0.1, bias="all"
    )
    full = a.arm == "full"
    if not full:
        model = get_peft_model(model, peft_config)

    class EpochTimer(TrainerCallback):
        seconds = 0.0

        def on_epoch_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kw):  # before the epoch's evaluation and save
            EpochTimer.seconds += time.perf_counter() - self.t

    with tempfile.TemporaryDirectory() as out:
        guide = dict(
            output_dir=out,
            learning_rate=1e-3,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=16,
            num_train_epochs=a.epochs,
            weight_decay=0.01,
            eval_strategy="epoch",
            save_strategy="epoch",
            load_best_model_at_end=True,
            report_to="none",
            disable_tqdm=True,
            seed=a.seed,
            logging_strategy="no",
        )
        args = TrainingArguments(**{**guide, **(full_finetune_args(a) if full else {})})
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=val,
            processing_class=tokenizer,
            data_collator=DataCollatorForTokenClassification(tokenizer=tokenizer),
            compute_metrics=compute_metrics,
            callbacks=[EpochTimer()],
        )
        trainer.train()
        test_metrics = trainer.evaluate(test, metric_key_prefix="test")
        if a.save_adapter:  # the adapter as the guide shares it: PEFT files only, no label list
            model.save_pretrained(a.save_adapter)
    val_f1 = [e["eval_f1"] for e in trainer.state.log_history if "eval_f1" in e]
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "autocast": "bf16" if args.bf16 else "fp32",
        "validation_f1_by_epoch": val_f1,
        "tokens_per_s": train_tokens * a.epochs / EpochTimer.seconds,
        "train_s": EpochTimer.seconds,
        "train_tokens_per_epoch": train_tokens,
        "test_f1": test_metrics["test_f1"],
        "test_precision": test_metrics["test_precision"],
        "test_recall": test_metrics["test_recall"],
    }


def full_finetune_args(a) -> dict:
    """TrainingArguments of the full fine-tuning arm (what differs from the guide's)."""
    import torch

    from loratag.precision import cpu_bf16

    return {
        "learning_rate": a.full_lr,
        "warmup_steps": 0.06,  # a float in [0, 1): a share of all steps
        "lr_scheduler_type": "linear",
        "train_sampling_strategy": "group_by_length",
        "bf16": cpu_bf16() != "emulated",
        "use_cpu": not torch.cuda.is_available(),  # Trainer's bf16 on a CPU asks for it
    }


def loratag_arm(a) -> dict:
    from loratag.config import Config, TrainConfig
    from loratag.train import train

    cfg = Config(
        model=a.model,
        data=a.data,
        train=TrainConfig(epochs=a.epochs, max_train_sentences=a.train_sentences, seed=a.seed, checkpoint_minutes=0),
    )
    with tempfile.TemporaryDirectory() as out:
        run = train(cfg, Path(out) / "run", progress=False)
        m = json.loads((run / "metrics.json").read_text())
        facts = json.loads((run / "config.json").read_text())["run"]
    seconds = sum(e["train_seconds"] for e in m["epochs"])
    tokens = sum(e["train_tokens"] for e in m["epochs"])
    return {
        "tokens_per_s": tokens / seconds,
        "train_s": seconds,
        "train_tokens_per_epoch": tokens // a.epochs,
        "test_f1": m["test"]["f1"],
        "test_precision": m["test"]["precision"],
        "test_recall": m["test"]["recall"],
        "autocast": facts["autocast"],
        "validation_f1_by_epoch": [e["validation"]["f1"] for e in m["epochs"]],
    }


def training_flops_per_token(model_dir: str, mean_len: float) -> float:
    """Matmul FLOPs per token of one training step with a frozen base: the forward pass plus the activation
    gradients (the same matmuls again); frozen weights need no weight gradients; LoRA adds <1%."""
    from transformers import AutoConfig

    from loratag.modeling import resolve_model

    c = AutoConfig.from_pretrained(resolve_model(model_dir))
    h, f, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    forward = 2 * n * (4 * h * h + 2 * h * f) + 4 * n * h * mean_len
    return 2 * forward


def random_base(kind: str) -> str:
    """A randomly initialised encoder of a larger size, with the MiniLM tokenizer (speed only)."""
    from transformers import BertConfig, BertModel

    from loratag.modeling import load_tokenizer, resolve_model

    sizes = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)}
    d = Path(tempfile.mkdtemp(prefix=f"random-{kind}-"))
    BertModel(BertConfig(vocab_size=30522, **sizes[kind])).save_pretrained(d)
    load_tokenizer(resolve_model("minilm")).save_pretrained(d)
    return str(d)


def slice_data(data: str, train: int | None, n: int) -> str:
    """A temporary copy of the first sentences of each split (for speed runs on large bases)."""
    from itertools import islice

    d = Path(tempfile.mkdtemp(prefix="bionlp-slice-"))
    for split, count in (("train", train), ("validation", n), ("test", n)):
        with open(Path(data) / f"{split}.json", encoding="utf-8") as f:
            (d / f"{split}.json").write_text("".join(islice(f, count)))
    (d / "label.json").write_text((Path(data) / "label.json").read_text())
    return str(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("LORATAG_BIONLP_DIR", "../shared/data/bionlp2004"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--random-base", choices=("bert-base",), help="use a random encoder of this size instead")
    p.add_argument("--train-sentences", type=int, default=None, help="first N training sentences [default: all]")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--eval-sentences",
        type=int,
        default=None,
        help="score on the first N validation and test sentences only (speed runs on large bases)",
    )
    p.add_argument("--arms", default="guide,loratag", help="guide, loratag, full (full fine-tuning, no LoRA)")
    p.add_argument("--full-lr", type=float, default=1e-4, help="the full fine-tuning arm's learning rate")
    p.add_argument("--save-adapter", help="keep the guide arm's best adapter here (plain PEFT, as the guide saves it)")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        import transformers

        transformers.logging.set_verbosity_error()
        emit({"guide": guide_arm, "full": guide_arm, "loratag": loratag_arm}[a.arm](a))
        return
    if a.random_base:
        a.model = random_base(a.random_base)
    if a.eval_sentences:
        a.data = slice_data(a.data, a.train_sentences, a.eval_sentences)
    peak = matmul_peak()
    args = ["--data", a.data, "--model", a.model, "--epochs", str(a.epochs), "--seed", str(a.seed)]
    if a.train_sentences:
        args += ["--train-sentences", str(a.train_sentences)]
    if a.save_adapter:
        args += ["--save-adapter", a.save_adapter]
    args += ["--full-lr", str(a.full_lr)]
    results = {arm: run_arm(__file__, arm, args) for arm in a.arms.split(",")}
    out = {
        "model": a.random_base or a.model,
        "train_sentences": a.train_sentences or "all",
        "epochs": a.epochs,
        "cpu": cpu_facts(),
        "matmul_peak_gflops": peak,
        **results,
    }
    if "guide" in results and "loratag" in results:
        g, lt = results["guide"], results["loratag"]
        out["speedup_tokens_per_s"] = round(lt["tokens_per_s"] / g["tokens_per_s"], 2)
        out["test_f1_delta_points"] = round(100 * (lt["test_f1"] - g["test_f1"]), 2)
        # mean real length: tokens per epoch / sentences (same tokenizer for both arms)
        from loratag.data import load_corpus

        n = len(load_corpus(a.data).splits["train"][: a.train_sentences])
        fpt = training_flops_per_token(a.model, g["train_tokens_per_epoch"] / n)
        for arm in ("guide", "loratag"):
            gf = fpt * results[arm]["tokens_per_s"] / 1e9
            results[arm]["achieved_gflops"] = round(gf, 1)
            results[arm]["share_of_fp32_peak"] = round(gf / peak["fp32"], 3)
            results[arm]["share_of_bf16_peak"] = round(gf / peak["bf16"], 3)
        out["training_mflop_per_token"] = round(fpt / 1e6, 2)
    emit(out)


if __name__ == "__main__":
    main()
