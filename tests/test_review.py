"""The eleven defects a review of the code found (issue 26), one test (or a few) each; every one failed on the code
before its fix."""

import ast
import gzip
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratag.cli import main
from loratag.config import Config
from loratag.labels import LabelSet
from loratag.serve.settings import ServeSettings
from loratag.tagger import Tagger
from loratag.train import train

from .conftest import RESOURCES

SRC = Path(__file__).parents[1] / "src" / "loratag"
DOCS = [Path(__file__).parents[1] / "README.md", *sorted((Path(__file__).parents[1] / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory) -> Path:
    from .conftest import guide_lora, guide_train

    cfg = Config(
        model=str(tiny_bert),
        data=str(RESOURCES / "tiny"),
        lora=guide_lora(r=4, alpha=8),
        train=guide_train(lr=5e-3, batch_size=4, epochs=1, eval_batch_size=4, checkpoint_minutes=0, precision="fp32"),
    )
    return train(cfg, tmp_path_factory.mktemp("review") / "run", progress=False)


# ---- 1 and 2: exact resume at every kill point, the CUDA RNG saved too ---------------------------------------------


class Killed(BaseException):
    """A kill -9 stand-in: not an Exception, so nothing on the way up handles it."""


def _kill_at(monkeypatch, where: str, nth: int) -> None:
    """Raise Killed right after the ``nth`` checkpoint is written, or during the ``nth`` validation."""
    from loratag import rundir
    from loratag.train.session import Session

    calls = {"n": 0}
    if where == "checkpoint":
        original = rundir.save_checkpoint

        def save(*a, **kw):
            original(*a, **kw)
            calls["n"] += 1
            if calls["n"] == nth:
                raise Killed

        monkeypatch.setattr(rundir, "save_checkpoint", save)
    else:
        original = Session.validate

        def validate(self):
            calls["n"] += 1
            if calls["n"] == nth:
                raise Killed
            return original(self)

        monkeypatch.setattr(Session, "validate", validate)


@pytest.mark.parametrize(
    "where, nth, minutes",
    [
        ("checkpoint", 3, 1e-9),  # mid-epoch: a checkpoint after every step, killed after the third
        ("checkpoint", 1, 0),  # just after epoch 1's checkpoint (the usual resume point)
        ("validation", 2, 0),  # during epoch 2's evaluation, resumed from epoch 1's checkpoint
    ],
    ids=["mid-epoch", "after-epoch-checkpoint", "during-evaluation"],
)
def test_resume_is_exact_at_every_kill_point(tiny_cfg, tmp_path, monkeypatch, where, nth, minutes):
    # dropout everywhere (LoRA 0.1 and the base's own): a resumed epoch must draw the same masks
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, checkpoint_minutes=minutes, epochs=2))
    full = train(cfg, tmp_path / "full", progress=False)
    with monkeypatch.context() as mp:
        _kill_at(mp, where, nth)
        with pytest.raises(Killed):
            train(cfg, tmp_path / "killed", progress=False)
    assert (tmp_path / "killed" / "checkpoint.pt").is_file() and not (tmp_path / "killed" / "metrics.json").exists()
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    for name in ("adapter", "last"):
        a = load_file(full / name / "adapter_model.safetensors")
        b = load_file(resumed / name / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}/{k}: max difference {(a[k] - b[k]).abs().max():.3g}"
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (full, resumed))
    assert [e["train_loss"] for e in ma["epochs"]] == [e["train_loss"] for e in mb["epochs"]]
    assert ma["test"]["f1"] == mb["test"]["f1"]


def test_checkpoint_rng_holds_the_cuda_generator_on_cuda(monkeypatch):
    """On CUDA, dropout draws from the GPU's generator: a checkpoint holds it and resume puts it back."""
    from loratag.train import rng

    cuda_state = torch.tensor([7, 8, 9], dtype=torch.uint8)
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.update(state=state))
    state = rng.capture(torch.device("cuda", 0))
    assert torch.equal(state["cuda"], cuda_state) and state["cpu"].dtype == torch.uint8
    rng.restore(state, torch.device("cuda", 0))
    assert torch.equal(restored["state"], cuda_state)
    assert "cuda" not in rng.capture(torch.device("cpu"))


# ---- 3: one answer to "which labels?" for predict, evaluate and serve ----------------------------------------------


def test_labels_that_contradict_the_adapters_own_are_refused_everywhere(run, tmp_path):
    from loratag.serve.pool import AdapterPool

    own = LabelSet.load(run / "labels.json")
    shuffled = LabelSet(tuple(reversed(own.labels)))
    with pytest.raises(ValueError, match="--labels"):
        Tagger.load(run, labels=shuffled, device="cpu")
    with pytest.raises(ValueError, match="--labels"):
        AdapterPool([(run, "a")], labels=shuffled)
    # the same labels are no contradiction
    assert Tagger.load(run, labels=own, device="cpu").labels == own
    assert AdapterPool([(run, "a")], labels=own).adapters["a"].labels == own


# ---- 4: the output format from the whole name ----------------------------------------------------------------------


def test_predict_output_jsonl_gz_is_gzipped_json_lines(run, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("IL-2 gene expression requires NF-kappa B.\nT cells express CD28.\n")
    out = tmp_path / "out.jsonl.gz"
    assert main(["predict", str(run), "--precision", "fp32", "--input", str(src), "--output", str(out)]) == 0
    docs = [json.loads(line) for line in gzip.decompress(out.read_bytes()).decode().splitlines()]
    assert [d["text"] for d in docs] == src.read_text().splitlines()


def test_predict_output_with_an_unknown_suffix_is_an_error(run, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("IL-2 gene expression requires NF-kappa B.\n")
    assert main(["predict", str(run), "--input", str(src), "--output", str(tmp_path / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert "out.csv" in err and ".jsonl" in err and ".conll" in err
    assert not (tmp_path / "out.csv").exists()


# ---- 5: a config key in the wrong section --------------------------------------------------------------------------


def test_a_section_inside_the_wrong_section_is_an_error():
    with pytest.raises(ValueError, match=r"section 'lora': 'train' belongs in section 'top level'"):
        Config.from_dict({"lora": {"r": 8, "train": {"lr": 5e-4}}})
    with pytest.raises(ValueError, match=r"section 'lora': 'lr' belongs in section 'train'"):
        Config.from_dict({"lora": {"lr": 5e-4}})


# ---- 6: --quantize int8 with another precision ---------------------------------------------------------------------


def test_quantize_int8_with_an_explicit_low_precision_is_an_error(run, tmp_path, capsys):
    with pytest.raises(ValueError, match="--quantize int8.*--precision bf16"):
        Tagger.load(run, quantize="int8", precision="bf16", device="cpu")
    assert main(["predict", str(run), "--quantize", "int8", "--precision", "fp16", "--text", "IL-2"]) == 2
    assert "--precision fp16" in capsys.readouterr().err
    assert Tagger.load(run, quantize="int8", precision="auto", device="cpu").precision == "fp32"


# ---- 7: no arbitrary pickle from checkpoint.pt ---------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this opens (creates) the marker file: code run by loading
        return (open, (self.marker, "w"))


def _evil_checkpoint(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state": {"history": []}, "x": _Payload(marker)}, folder / "checkpoint.pt")


def test_plot_does_not_run_code_from_a_checkpoint(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "sent", marker)
    assert main(["plot", str(tmp_path / "sent"), "--out", str(tmp_path / "c.png")]) == 2
    assert not marker.exists()
    assert "checkpoint.pt" in capsys.readouterr().err


def test_resume_does_not_run_code_from_a_checkpoint(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(tiny_cfg.to_dict()))
    marker = tmp_path / "pwned"
    _evil_checkpoint(out, marker)
    with pytest.raises(ValueError, match="checkpoint.pt"):
        train(tiny_cfg, out, resume=True, progress=False)
    assert not marker.exists()


# ---- 8: Dist.any is "any rank", not "rank 0" -----------------------------------------------------------------------

_ANY = """
import sys
from loratag.train.dist import Dist
d = Dist.from_env("cpu")
print(d.any(d.rank == 1), d.any(False), d.any(True))
d.close()
"""


def test_dist_any_is_true_when_any_rank_says_so(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ANY], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode().split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [["True", "False", "True"]] * 2


# ---- 9: serve --max-queue 0 ----------------------------------------------------------------------------------------


def test_serve_max_queue_0_is_refused(run, capsys):
    with pytest.raises(ValueError, match="--max-queue"):
        ServeSettings(max_queue=0)
    assert main(["serve", str(run), "--max-queue", "0"]) == 2
    assert "--max-queue must be >= 1" in capsys.readouterr().err


# ---- 10: no library code that exists only for tests ----------------------------------------------------------------


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in SRC.rglob("*.py")}


def test_every_module_level_function_is_used_by_the_library_or_documented():
    sources = _sources()
    everything = "\n".join(sources.values())
    docs = "\n".join(p.read_text() for p in DOCS)
    unused = []
    for path, text in sources.items():
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                uses = len(re.findall(rf"\b{node.name}\b", everything))
                if uses <= 1 and node.name not in docs:
                    unused.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not unused, f"defined, used nowhere in the library and documented nowhere: {unused}"


def test_every_environment_variable_the_library_reads_is_documented():
    docs = "\n".join(p.read_text() for p in DOCS)
    read = set()
    for text in _sources().values():
        read |= set(re.findall(r"environ(?:\.get)?[\[(]\s*[\"']([A-Z_]+)[\"']", text))
        consts = dict(re.findall(r"^([A-Z_]+)\s*=\s*[\"']([A-Z_]+)[\"']", text, flags=re.M))
        read |= {consts[n] for n in re.findall(r"environ(?:\.get)?[\[(]\s*([A-Z_]+)\b", text) if n in consts}
    undocumented = sorted(v for v in read if v not in docs)
    assert not undocumented, f"environment variables the library reads but no page documents: {undocumented}"


# ---- 11: the base model named so that others can load the adapter --------------------------------------------------

HUB_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_an_adapter_on_the_bundled_minilm_names_its_hub_id():
    from loratag.modeling import build_model, resolve_model

    labels = LabelSet(("O", "B-X", "I-X"))
    model = build_model(Config(model="minilm"), labels, meta=True)
    assert model.peft_config["default"].base_model_name_or_path == HUB_MINILM
    # and that id loads offline, from the package
    assert resolve_model(HUB_MINILM) == resolve_model("minilm")


def test_the_card_names_the_hub_base_and_the_data_by_name(tmp_path):
    from loratag.train.card import write_card

    cfg = Config(model="minilm", data="/home/someone/corpora/bionlp2004")
    metrics = {"best_epoch": 1, "best_validation_f1": 0.5, "mode": "default", "epochs": []}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    write_card(tmp_path, cfg, LabelSet(("O", "B-X", "I-X")), metrics, {"trainable_params": 1})
    card = (tmp_path / "README.md").read_text()
    assert f"base_model: {HUB_MINILM}" in card
    assert "/home/someone" not in card and "bionlp2004" in card


def test_push_warns_that_a_local_directory_base_cannot_be_loaded_elsewhere(run, tmp_path, caplog):
    from loratag.hub import push

    class Api:
        def create_repo(self, repo_id, private, exist_ok):
            return f"https://hub/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            self.files = sorted(p.name for p in Path(folder_path).iterdir())

    api = Api()
    with caplog.at_level("WARNING", logger="loratag"):
        push(run, "me/x", api=api)
    assert "adapter_config.json" in api.files
    assert any("local directory" in r.getMessage() and "base" in r.getMessage() for r in caplog.records)
