"""Data-parallel training under torchrun (2 CPU processes, gloo) gives what one process gives."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import RESOURCES


def launch_command(processes: int) -> list[str]:
    """``loratag`` in ``processes`` local processes: torchrun when more than one (append loratag's arguments)."""
    if processes <= 1:
        return [sys.executable, "-m", "loratag"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "loratag",
    ]


TOL = 1e-5  # float sums in another order (two processes, all-reduce), nothing more
# Adam divides by sqrt(v): a gradient near zero that differs in its last bits between the two reduction orders moves
# its weight by a visible fraction of one step (lr 5e-3). Seen on an AMX CPU (fp32): 1.1e-5 on one bias element of 32;
# 5e-5 is 1% of a single step, far below what a wrong gradient (a missing or doubled shard) would give.
WEIGHT_TOL = 5e-5


def _data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    lines = (RESOURCES / "tiny/train.json").read_text().splitlines()
    (d / "train.json").write_text("\n".join(lines * 6) + "\n")  # 48 sentences
    for name in ("validation.json", "test.json", "label.json"):
        (d / name).write_text((RESOURCES / "tiny" / name).read_text())
    return d


def _args(model, data, out, batch):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        str(batch),
        "--lora-r",
        "4",
        "--lora-dropout",
        "0",
        "--lr",
        "5e-3",
        "--eval-batch-size",
        "4",
        "--seed",
        "3",
        "--precision",
        "fp32",  # compared at fp32 tolerances (auto is bf16 on CPUs with AMX / AVX-512-BF16)
    ]


def _launch(args, procs: int, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [*launch_command(procs), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **kw,
    )


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun may start its workers in sessions of their own)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _ok(proc):
    assert proc.wait(timeout=900) == 0, proc.stderr.read().decode()[-3000:]


def _same_run(a, b):
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["best_epoch"] == mb["best_epoch"]
    for ea, eb in zip(ma["epochs"], mb["epochs"], strict=True):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], abs=TOL)
        assert ea["validation"]["f1"] == pytest.approx(eb["validation"]["f1"], abs=TOL)
        assert ea["validation"]["sentences"] == eb["validation"]["sentences"]
    assert ma["test"]["f1"] == pytest.approx(mb["test"]["f1"], abs=TOL)
    assert ma["test"]["words"] == mb["test"]["words"]  # every sentence scored once
    wa, wb = (load_file(r / "adapter/adapter_model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=WEIGHT_TOL)


def test_two_processes_match_one_and_resume(tiny_bert_nodrop, tmp_path):
    data = _data(tmp_path)
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _ok(_launch(_args(tiny_bert_nodrop, data, one, 4), 1))
    _ok(_launch(_args(tiny_bert_nodrop, data, two, 2), 2))
    facts = json.loads((two / "config.json").read_text())["run"]
    assert facts["processes"] == 2 and facts["effective_batch"] == "2 x 2"
    assert json.loads((one / "config.json").read_text())["run"]["steps_per_epoch"] == facts["steps_per_epoch"]
    _same_run(one, two)

    proc = _launch([*_args(tiny_bert_nodrop, data, killed, 2), "--checkpoint-minutes", "0.00001"], 2)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and both workers, at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(0.5)
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    _ok(_launch(["train", "--out", str(killed), "--resume"], 2))
    _same_run(two, killed)
