"""Resume: exact in every epoch after a real SIGKILL, damaged checkpoints skipped, no silent retrain."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KILLER, built_once, write_sst2
from transformers import TrainerCallback

from loralab.cli import main

# 64 examples / batch 8 = 8 steps per epoch; 2 epochs = 16 steps; checkpoints at 4, 8, 12, 16.
COMMON = [
    "model.name=tiny-llama", "data.task=sst2", "train.epochs=2", "train.save_steps=4",
    "train.batch_size=8", "train.logging_steps=2", "lora.dropout=0.1", "run.name=r",
    # Fixed kernels: the reference run may come from another xdist worker, whose probes (and
    # so its `auto` choices, another rounding order) can differ from this one's.
    "train.precision=fp32", "model.attention=eager",
]  # fmt: skip


def _train(*args) -> int:
    """`loralab train ...` in this process: only the killed run needs a process of its own."""
    return main(["train", *args])


def _killed_at_12(folder):
    """A run SIGKILLed right after its step-12 checkpoint (step 4 of the second epoch)."""
    data = write_sst2(folder / "sst2")
    script = folder / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run(
        [sys.executable, str(script), *COMMON, f"data.data_dir={data}", f"run.output_dir={folder}"],
        env={**os.environ, "KILL_AT": "12"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.fixture
def killed(tmp_path_factory, tmp_path):
    """This test's own copy of the killed run (the kill itself happens once per session)."""
    shared = built_once(tmp_path_factory, "resume-killed-at-12", _killed_at_12)
    return Path(shutil.copytree(shared / "r", tmp_path / "killed" / "r"))


def _uninterrupted(folder):
    data = write_sst2(folder / "sst2")
    assert _train("--quiet", *COMMON, f"data.data_dir={data}", f"run.output_dir={folder}") == 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted 2-epoch run every resumed run must equal."""
    folder = built_once(tmp_path_factory, "resume-uninterrupted", _uninterrupted)
    return folder / "r"


def _losses(run) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    out: dict[int, float] = {}
    for rec in lines:
        if "train/loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["train/loss"]
    return out


def _assert_same_result(resumed, full):
    from safetensors.torch import load_file

    sa = json.loads((resumed / "summary.json").read_text())
    sb = json.loads((full / "summary.json").read_text())
    assert sa["status"] == sb["status"] == "completed"
    assert sa["steps"] == sb["steps"] == 16
    assert sa["metrics"] == sb["metrics"]
    assert sa["train_loss"] == sb["train_loss"]  # the whole run, not the steps after the resume
    wa = load_file(resumed / "adapter" / "adapter_model.safetensors")
    wb = load_file(full / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max |Δ| {(wa[k] - wb[k]).abs().max()}"
    assert _losses(resumed) == _losses(full)
    # The log as an uninterrupted run's: the whole run's mean loss (it was the steps after the
    # resume), and each record once (the step-0 records came again at the checkpoint's step).
    assert _logged(resumed, "train/mean_loss") == _logged(full, "train/mean_loss")
    for key in ("efficiency/total", "verification/base_unchanged"):
        assert [s for s, _ in _logged(resumed, key)] == [s for s, _ in _logged(full, key)], key
    return sa


def _logged(run, key: str) -> list[tuple[int, object]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r.get("step"), r[key]) for r in lines if key in r]


@pytest.mark.long
def test_sigkill_in_second_epoch_resumes_bit_identical(killed, uninterrupted):
    full = uninterrupted
    run = killed
    assert (run / "checkpoints" / "checkpoint-12" / "trainer_state.json").is_file()
    assert not (run / "checkpoints" / "checkpoint-16").exists()
    state = json.loads((run / "checkpoints" / "checkpoint-12" / "loralab_state.json").read_text())
    assert state["train_time_s"] > 0 and state["train_cpu_time_s"] > 0
    assert _train("--resume", str(run), "--quiet") == 0
    summary = _assert_same_result(run, full)
    assert summary["resumed_from"].endswith("checkpoint-12")
    # Training time covers the whole run: the killed attempt up to its checkpoint, then this one.
    assert summary["train_time_s"] > state["train_time_s"]
    assert summary["train_cpu_time_s"] > state["train_cpu_time_s"]
    # The wall time too (was this attempt's), with the killed attempt's start-up (was left out).
    assert state["setup_time_s"] > 0
    assert summary["wall_time_s"] >= summary["train_time_s"] + state["setup_time_s"]
    # Tokens are the whole run's too (were the resumed attempt's alone): as the uninterrupted
    # run's, with the killed attempt's up to its checkpoint recorded there.
    whole = json.loads((full / "summary.json").read_text())["tokens"]
    assert summary["tokens"] == whole and 0 < state["tokens_real"] < whole["real"]
    # train_loss is the mean of all 16 steps: the mean of the logged per-2-step losses
    logged = _losses(full)
    assert summary["train_loss"] == pytest.approx(sum(logged.values()) / len(logged), rel=1e-5)


@pytest.mark.long
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(killed, uninterrupted, capfd):
    full = uninterrupted
    run = killed
    weights = run / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    capfd.readouterr()
    assert _train("--resume", str(run), "--quiet") == 0
    err = capfd.readouterr().err
    assert "skipping damaged checkpoint" in err and "checkpoint-12" in err
    summary = _assert_same_result(run, full)
    assert summary["resumed_from"].endswith("checkpoint-8")


def test_resume_without_checkpoints_refuses_unless_restart(killed, uninterrupted, capsys):
    full = uninterrupted
    run = killed
    shutil.rmtree(run / "checkpoints")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "--restart" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert main(["train", "--resume", str(run), "--restart", "--quiet"]) == 0
    # Trained again from step 0: one record per step, and the same result as never killed.
    summary = _assert_same_result(run, full)
    assert summary["resumed_from"] is None


def test_a_run_still_training_is_not_resumed_beside_itself(killed, capsys):
    """`--resume` of a run another live process trains in (it holds the folder's lock) is a user
    error that changes nothing; a killed trainer's lock is gone with it (the tests above)."""
    import fcntl

    from loralab import rundir

    run = killed
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with open(run / rundir.RUN_LOCK, "a") as live:  # what a live trainer holds
        fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is being trained by another process right now" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_resume_on_other_data_or_processes_is_refused(killed, tmp_path, capsys):
    """The checkpoint records the data's fingerprint and the process count: a resume whose data
    changed (here: another training file) would pool two setups under one config, and one with
    another number of processes another global batch. Both are user errors that train nothing."""
    from loralab.checkpoints import check_same_run
    from loralab.errors import LoralabError

    run = killed
    state = json.loads((run / "checkpoints" / "checkpoint-12" / "loralab_state.json").read_text())
    assert state["processes"] == 1 and state["data_fingerprint"]["train_rows"] == 64
    other = write_sst2(tmp_path / "other", seed=1)  # same size, other sentences
    config = (run / "config.yaml").read_text()
    data_dir = next(line.split(":", 1)[1].strip() for line in config.splitlines() if "data_dir:" in line)  # fmt: skip
    (run / "config.yaml").write_text(config.replace(data_dir, str(other)))
    shutil.rmtree(run / "checkpoints" / "checkpoint-12")  # from checkpoint-8: records to drop
    before = {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the run has changed since, in its data" in err and "Traceback" not in err
    # Nothing changed: not the checkpoints, nor metrics.jsonl (its records after step 8 stay).
    assert {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    steps = [json.loads(x).get("step") or 0 for x in (run / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert max(steps) > 8
    ckpt = run / "checkpoints" / "checkpoint-8"
    with pytest.raises(LoralabError, match="it trained on 1, this resume has 2"):
        check_same_run(ckpt, state["data_fingerprint"], processes=2)
    check_same_run(ckpt, state["data_fingerprint"], processes=1)  # unchanged: no complaint


@pytest.mark.long
def test_sigterm_to_loralab_train_leaves_a_failed_summary_and_its_checkpoints(tmp_path):
    """`kill PID` stops a training like Ctrl-C: exit 130, the checkpoints kept, and a summary
    saying why it stopped (a folder without one looked unfinished: still training, or lost)."""
    import time

    from conftest import start_cli

    data = write_sst2(tmp_path / "sst2")
    args = ["train", "--quiet", *COMMON, "train.epochs=200", "train.save_steps=2",
            f"data.data_dir={data}", f"run.output_dir={tmp_path}"]  # fmt: skip
    proc = start_cli(args, tmp_path / "log.txt")
    run, deadline = tmp_path / "r", time.time() + 300
    while not list(run.glob("checkpoints/checkpoint-*/trainer_state.json")):  # older ones rotate
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, (tmp_path / "log.txt").read_text()
    summary = json.loads((run / "summary.json").read_text())
    # It stopped at the end of the step under way, with a checkpoint there (`loralab.stopping`).
    assert summary["status"] == "failed", summary
    stopped = re.fullmatch(r"interrupted \(Ctrl-C or SIGTERM\): stopped at step (\d+) with a "
                           r"checkpoint there; `loralab train --resume (.+)` continues", summary["error"])  # fmt: skip
    assert stopped and Path(stopped[2]) == run, summary["error"]
    ckpt = run / "checkpoints" / f"checkpoint-{stopped[1]}"
    assert (ckpt / "adapter_model.safetensors").is_file() and (
        ckpt / "trainer_state.json"
    ).is_file()
    assert (
        f"loralab: interrupted; {summary['error'].split(': ', 1)[1]}"
        in (tmp_path / "log.txt").read_text()
    )


class _SigtermAt(TrainerCallback):
    """Sends this process SIGTERM at the end of one step, as `kill PID` would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class _SigtermDuring(TrainerCallback):
    """Sends this process SIGTERM as one step begins (it lands during that step)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class _SigtermInEval(TrainerCallback):
    """SIGTERM while the periodic evaluation of one step scores its batches."""

    def __init__(self, step: int):
        self.step = step

    def on_prediction_step(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.step = None
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.long
def test_sigterm_during_an_evaluation_cuts_it_and_the_resume_runs_it_first(tmp_path):
    """A periodic evaluation can outlast a study worker's 30 s wait (minutes on SQuAD): a stop
    cuts it at its next batch and saves the step it was scoring, owing it; the resume runs it
    first, and the run ends as an uninterrupted one, records included."""
    from loralab.config import build_config
    from loralab.stopping import Stopped
    from loralab.train import train

    data = write_sst2(tmp_path / "sst2")
    common = [*COMMON, "train.eval_steps=4", "train.save_steps=3", "train.eval_batch_size=4",
              f"data.data_dir={data}"]  # fmt: skip
    assert _train("--quiet", *common, f"run.output_dir={tmp_path / 'ref'}") == 0
    cfg = build_config(overrides=[*common, f"run.output_dir={tmp_path}"])
    with pytest.raises(Stopped, match="stopped at step 4"):  # not after one more step
        train(cfg, quiet=True, callbacks=[_SigtermInEval(4)])
    run = tmp_path / "r"
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == [
        "checkpoint-3",
        "checkpoint-4",
    ]
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "loralab_state.json").read_text())
    assert state["eval_owed"] == 4
    assert _logged(run, "eval/accuracy") == []  # cut short: nothing half-scored was logged
    assert _train("--resume", str(run), "--quiet") == 0
    _assert_same_result(run, tmp_path / "ref" / "r")
    assert _logged(run, "eval/accuracy") == _logged(tmp_path / "ref" / "r", "eval/accuracy")
    assert [s for s, _ in _logged(run, "eval/accuracy")] == [4, 8, 12, 16]


@pytest.mark.long
def test_sigterm_in_the_step_before_an_evaluation_does_not_wait_for_it(tmp_path):
    from loralab.config import build_config
    from loralab.stopping import Stopped
    from loralab.train import train

    data = write_sst2(tmp_path / "sst2")
    cfg = build_config(overrides=[*COMMON, "train.eval_steps=4", "train.eval_batch_size=4",
                                  f"data.data_dir={data}", f"run.output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(Stopped, match="stopped at step 4"):
        train(cfg, quiet=True, callbacks=[_SigtermDuring(4)])
    run = tmp_path / "r"
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "loralab_state.json").read_text())
    assert state["eval_owed"] == 4 and _logged(run, "eval/accuracy") == []
    assert _train("--resume", str(run), "--quiet") == 0
    assert [s for s, _ in _logged(run, "eval/accuracy")] == [4, 8, 12, 16]


class _ArmAt(TrainerCallback):
    """Arms `armed` at the end of one step (its periodic evaluation follows)."""

    def __init__(self, step: int, armed: list):
        self.step, self.armed = step, armed

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.armed.append(True)


@pytest.mark.long
def test_sigterm_during_a_heads_own_evaluation_loop_cuts_it_too(tmp_path, monkeypatch):
    """The LM head scores its verbalizers in a loop of its own, outside the Trainer's."""
    from loralab.config import build_config
    from loralab.heads import prompting
    from loralab.stopping import Stopped
    from loralab.train import train

    data = write_sst2(tmp_path / "sst2")
    common = [*COMMON, "model.head=lm", "train.epochs=1", "train.eval_steps=4",
              "train.save_steps=3", "train.eval_batch_size=4", f"data.data_dir={data}"]  # fmt: skip
    assert _train("--quiet", *common, f"run.output_dir={tmp_path / 'ref'}") == 0
    armed, scored = [], prompting.target_log_probs

    def scoring(*args, **kwargs):  # SIGTERM at the first batch of step 4's evaluation
        if armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGTERM)
        return scored(*args, **kwargs)

    monkeypatch.setattr(prompting, "target_log_probs", scoring)
    cfg = build_config(overrides=[*common, f"run.output_dir={tmp_path}"])
    with pytest.raises(Stopped, match="stopped at step 4"):
        train(cfg, quiet=True, callbacks=[_ArmAt(4, armed)])
    run = tmp_path / "r"
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "loralab_state.json").read_text())
    assert state["eval_owed"] == 4
    assert _logged(run, "eval/accuracy") == []
    monkeypatch.undo()
    assert _train("--resume", str(run), "--quiet") == 0
    assert _logged(run, "eval/accuracy") == _logged(tmp_path / "ref" / "r", "eval/accuracy")
    assert [s for s, _ in _logged(run, "eval/accuracy")] == [4, 8]


@pytest.mark.long
def test_sigterm_between_checkpoints_saves_one_where_it_stops_and_resumes_bit_identical(tmp_path, uninterrupted):  # fmt: skip
    """Stopping lost up to save_steps steps (a day's work on a long run); now the step under
    way ends, a checkpoint is saved there, and the resume equals an uninterrupted run."""
    from loralab.config import build_config
    from loralab.stopping import Stopped
    from loralab.train import train

    data = write_sst2(tmp_path / "sst2")
    cfg = build_config(overrides=[*COMMON, f"data.data_dir={data}", f"run.output_dir={tmp_path}"])
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match="stopped at step 7"):  # signalled after step 6's own check
        train(cfg, quiet=True, callbacks=[_SigtermAt(6)])
    run = tmp_path / "r"
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-7",
    ]
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    assert signal.getsignal(signal.SIGTERM) == handler  # the run's own is gone again
    assert _train("--resume", str(run), "--quiet") == 0
    summary = _assert_same_result(run, uninterrupted)
    assert summary["resumed_from"].endswith("checkpoint-7")


def test_a_damaged_per_process_rng_state_marks_the_checkpoint_damaged(killed):
    """A multi-process checkpoint holds rng_state_0.pth, rng_state_1.pth, ...; a truncated one
    passed the check and the resume then crashed on it (rank 1) instead of skipping it."""
    from loralab.checkpoints import checkpoint_problem, newest_good_checkpoint

    ckpt = killed / "checkpoints" / "checkpoint-12"
    one = (ckpt / "rng_state.pth").read_bytes()
    for rank in (0, 1):  # as two processes would have saved them
        (ckpt / f"rng_state_{rank}.pth").write_bytes(one)
    assert checkpoint_problem(ckpt) is None
    (ckpt / "rng_state_1.pth").write_bytes(one[: len(one) // 2])
    assert "rng_state_1.pth is truncated or damaged" in checkpoint_problem(ckpt)
    # A checkpoint of 3 processes lacking the third's state is incomplete too.
    state = json.loads((ckpt / "loralab_state.json").read_text())
    (ckpt / "loralab_state.json").write_text(json.dumps({**state, "processes": 3}))
    (ckpt / "rng_state_1.pth").write_bytes(one)
    assert checkpoint_problem(ckpt) == "rng_state_2.pth is missing"
    good, skipped = newest_good_checkpoint(killed)
    assert good.name == "checkpoint-8" and "checkpoint-12" in skipped[0]


def test_a_sharded_models_checkpoint_is_checked_shard_by_shard(killed):
    """Full fine-tuning of a model past save_pretrained's max_shard_size saves shards and an
    index, no model.safetensors: such a checkpoint was "damaged" and never resumed."""
    from loralab.checkpoints import checkpoint_problem

    ckpt = killed / "checkpoints" / "checkpoint-12"
    weights = (ckpt / "adapter_model.safetensors").read_bytes()
    (ckpt / "adapter_model.safetensors").unlink()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name in shards:
        (ckpt / name).write_bytes(weights)
    index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(ckpt) is None
    (ckpt / shards[1]).write_bytes(weights[:100])
    assert shards[1] in checkpoint_problem(ckpt)
