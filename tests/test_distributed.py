"""Data-parallel training under torchrun (gloo on CPU): one run, global counts, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import built_once, write_sst2
from safetensors.torch import load_file

from loralab.cli import main

# 64 examples, global batch 8 (2 processes × 4 or 1 × 8): 8 steps, checkpoints every 2.
COMMON = [
    "model.name=tiny-llama", "train.max_steps=8", "train.lr=1e-2", "train.save_steps=2",
    "lora.dropout=0", "train.precision=fp32", "model.attention=eager", "run.name=r",
    "train.logging_steps=2",
]  # fmt: skip
ADAPTER_TOL = 1e-5  # fp32: the two layouts pad their batches differently (2×4 vs 8 rows)

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch.distributed as dist
    from transformers import TrainerCallback
    from loralab.config import build_config
    from loralab.train import train

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step >= int(os.environ["KILL_AT"]):
                dist.barrier()  # every process has written its part of the checkpoint
                os.kill(os.getpid(), signal.SIGKILL)

    train(build_config(overrides=sys.argv[1:]), quiet=True, callbacks=[KillAfterSave()])
    """
)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _torchrun(*argv, timeout=600, env=None):
    # torchrun's module, not its script: the script is on PATH only in an activated venv.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *argv]  # fmt: skip
    env = {**_env(), **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _loralab(*args):
    return [sys.executable, "-m", "loralab.cli", *args]


def _ddp_train(out: Path, data: Path, *extra):
    args = [
        "train",
        *COMMON,
        "train.batch_size=4",
        f"data.data_dir={data}",
        f"run.output_dir={out}",
    ]
    return _torchrun("--no-python", *_loralab(*args, *extra, "--quiet"))


def _reference_runs(tmp: Path):
    data = write_sst2(tmp / "sst2")
    ddp = _ddp_train(tmp / "ddp", data)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # The one-process reference runs in this process (a process of its own costs imports).
    single = ["train", *COMMON, "train.batch_size=8", f"data.data_dir={data}",
              f"run.output_dir={tmp / 'single'}", "--quiet"]  # fmt: skip
    assert main(single) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = built_once(tmp_path_factory, "ddp-reference", _reference_runs)
    return {"data": tmp / "sst2", "ddp": tmp / "ddp", "single": tmp / "single"}


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _max_adapter_diff(a: Path, b: Path) -> float:
    wa = load_file(a / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.long
def test_two_processes_make_one_run_equal_to_one_process_on_the_global_batch(runs):
    assert [p.name for p in runs["ddp"].iterdir()] == ["r"]  # one folder, written by rank 0
    ddp, single = _summary(runs["ddp"] / "r"), _summary(runs["single"] / "r")
    assert ddp["processes"] == 2 and single["processes"] == 1
    assert ddp["global_batch_size"] == single["global_batch_size"] == 8
    assert ddp["steps"] == single["steps"] == 8
    assert ddp["tokens"]["real"] == single["tokens"]["real"]  # both processes' batches counted
    assert ddp["metrics"] == single["metrics"]
    assert abs(ddp["train_loss"] - single["train_loss"]) < 1e-5
    assert _max_adapter_diff(runs["ddp"] / "r", runs["single"] / "r") < ADAPTER_TOL
    records = (runs["ddp"] / "r" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in records if "train/loss" in json.loads(x)]
    assert steps == [2, 4, 6, 8]  # one process logged, every logging step once


@pytest.mark.long
def test_a_killed_two_process_run_resumes_to_the_same_result(runs, tmp_path):
    tmp, data = tmp_path, runs["data"]
    script = tmp / "killer.py"
    script.write_text(KILLER)
    out = tmp / "killed"
    killed = _torchrun(
        str(script), *COMMON, "train.batch_size=4", f"data.data_dir={data}",
        f"run.output_dir={out}", env={"KILL_AT": "4"},
    )  # fmt: skip
    assert killed.returncode != 0
    run = out / "r"
    assert (run / "checkpoints" / "checkpoint-4").is_dir() and not (run / "summary.json").exists()
    resumed = _torchrun("--no-python", *_loralab("train", "--resume", str(run), "--quiet"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _summary(run), _summary(runs["ddp"] / "r")
    assert a["resumed_from"].endswith("checkpoint-4")
    assert a["steps"] == b["steps"] and a["metrics"] == b["metrics"]
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-6  # the whole run, all processes
    assert _max_adapter_diff(run, runs["ddp"] / "r") < ADAPTER_TOL


LEAVER = textwrap.dedent(
    """
    import atexit
    import torch.distributed as dist
    from loralab import distributed

    # registered first, so it runs after loralab's own exit handler (atexit is last-in first-out)
    atexit.register(lambda: print(f"rank {distributed.rank()} joined={dist.is_initialized()}"))
    distributed.init()
    print(f"rank {distributed.rank()} total={distributed.total([1.0])}", flush=True)
    """
)


def test_processes_leave_the_group_before_the_interpreter_exits(tmp_path):
    # A gloo group left to interpreter teardown can abort a rank with SIGABRT
    # ("terminate called without an active exception"), after the run folder is complete.
    script = tmp_path / "leaver.py"
    script.write_text(LEAVER)
    done = _torchrun(str(script), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} total=[2.0]" in done.stdout
        assert f"rank {rank} joined=False" in done.stdout
