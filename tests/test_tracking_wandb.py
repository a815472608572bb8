"""W&B as a mirror (a stand-in run records what loralab sends it): a start that fails is a user
error, a mirror that fails mid-run stops alone, the optimiser step is the charts' axis, and the
config sent is the resolved one. Also the run's own records around resumes and full FT."""

from __future__ import annotations

import json
import time

import pytest
from transformers import TrainerCallback

from loralab import tracking
from loralab.cli import main
from loralab.config import build_config
from loralab.train import train


class FakeRun:
    """What `wandb.init` returns, recording the calls; `.log` raises from call `fail_at` on,
    and `.finish` too unless `finish_works`."""

    def __init__(self, fail_at: int | None = None, finish_works: bool = False, **init):
        self.init, self.fail_at, self.finish_works = init, fail_at, finish_works
        self.logged, self.axes, self.summary, self.finished = [], [], {}, []
        self.finish_calls = []

    def define_metric(self, name, step_metric=None, **kw):
        self.axes.append((name, step_metric))

    def log(self, data, step=None, **kw):
        if self.fail_at is not None and len(self.logged) >= self.fail_at:
            raise ConnectionResetError("Connection lost")
        self.logged.append((dict(data), step))

    def finish(self, exit_code=0):
        self.finish_calls.append(exit_code)
        if self.fail_at is not None and not self.finish_works:
            raise ConnectionResetError("Connection lost")
        self.finished.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb.init returning a FakeRun (the last one is `runs[-1]`); offline, no key needed."""
    import wandb

    runs, opts = [], {}

    def init(**kw):
        runs.append(FakeRun(opts.get("fail_at"), opts.get("finish_works", False), **kw))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return runs, opts


def _args(data, out, *extra):
    return ["--quiet", "--model", "tiny-llama", "--data-dir", str(data), "--output-dir", str(out),
            "run.name=r", "train.batch_size=8", "train.precision=fp32", "tracking.wandb=offline",
            *extra]  # fmt: skip


def test_a_wandb_run_that_cannot_start_is_a_user_error(tmp_path, sst2_dir, monkeypatch, capsys):
    import wandb

    def refused(**kw):
        raise wandb.errors.CommError('Timed out while retrying: Post "http://x/graphql"\nmore')

    monkeypatch.setattr(wandb, "init", refused)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["train", *_args(sst2_dir, tmp_path, "train.max_steps=2")]) == 2
    err = capsys.readouterr().err
    assert (
        "could not start a run" in err and "Timed out" in err and "tracking.wandb=disabled" in err
    )
    assert "Traceback" not in err and not (tmp_path / "r" / "summary.json").exists()


def test_a_mirror_that_fails_mid_run_stops_alone(tmp_path, sst2_dir, fake_wandb, capsys):
    runs, opts = fake_wandb
    opts["fail_at"] = 2  # the third record (and the finish) raise, as W&B's lost service does
    assert main(["train", *_args(sst2_dir, tmp_path, "train.max_steps=6", "train.logging_steps=1")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert len(runs[-1].logged) == 2  # nothing sent after the failure
    assert runs[-1].finish_calls == [1]  # told it failed, once: the service was gone
    err = capsys.readouterr().err
    assert err.count("W&B stopped mirroring this run") == 1 and "Connection lost" in err
    steps = [json.loads(x).get("step") for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert 6 in steps  # the run's own log went on to the end


def test_a_mirror_that_fails_marks_its_wandb_run_failed(tmp_path, sst2_dir, fake_wandb, capsys):
    runs, opts = fake_wandb
    opts.update(fail_at=1, finish_works=True)  # a log refused (e.g. a value W&B rejects)
    assert main(["train", *_args(sst2_dir, tmp_path, "train.max_steps=4", "train.logging_steps=1")]) == 0  # fmt: skip
    # Finished at once with a failure code, and never again by the run's own end: W&B's exit
    # hook would have closed it as a success.
    assert runs[-1].finished == [1] and len(runs[-1].logged) == 1
    assert capsys.readouterr().err.count("W&B stopped mirroring this run") == 1


def test_the_step_is_a_metric_and_the_config_the_resolved_one(tmp_path, sst2_dir, fake_wandb):
    """W&B's own step only increases: a resume that logs the steps after its checkpoint again
    would be dropped, so the optimiser step goes in as `train/global_step`, the charts' axis."""
    runs, _ = fake_wandb
    assert main(["train", *_args(sst2_dir, tmp_path, "train.max_steps=4", "train.logging_steps=2")]) == 0  # fmt: skip
    run = runs[-1]
    assert ("*", tracking.STEP_KEY) in run.axes
    assert run.logged and all(step is None for _, step in run.logged)
    jsonl = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    sent = sorted(d[tracking.STEP_KEY] for d, _ in run.logged if tracking.STEP_KEY in d)
    assert sent == sorted(r["step"] for r in jsonl if "step" in r)
    # The config as config.yaml resolved it (was the config before resolution: lr null).
    saved = tracking.load_yaml(tmp_path / "r" / "config.yaml")
    config = run.init["config"]
    assert config["train"]["lr"] == saved["train"]["lr"] is not None
    assert config["model"]["attention"] == saved["model"]["attention"] != "auto"


def test_a_restart_draws_a_new_wandb_id(tmp_path, sst2_dir, fake_wandb):
    """--restart trains from step 0 again: the old W&B run holds the discarded steps."""
    runs, _ = fake_wandb

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            raise KeyboardInterrupt  # killed before any checkpoint

    cfg = build_config(overrides=["model.name=tiny-llama", f"data.data_dir={sst2_dir}",
                                  f"run.output_dir={tmp_path}", "run.name=r", "train.max_steps=3",
                                  "train.batch_size=8", "tracking.wandb=offline"])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True, callbacks=[Stop()])
    first = runs[-1].init["id"]
    assert main(["train", "--resume", str(tmp_path / "r"), "--restart", "--quiet"]) == 0
    assert runs[-1].init["id"] != first
    assert (tmp_path / "r" / "wandb_id.txt").read_text().strip() == runs[-1].init["id"]


def test_full_fine_tuning_writes_no_empty_records(tmp_path, sst2_dir):
    """Full FT has no verification or adapter records: no bare {time, step} lines for them."""
    args = _args(sst2_dir, tmp_path, "train.max_steps=4", "train.method=full", "tracking.log_every=2")  # fmt: skip
    assert main(["train", *[a for a in args if a != "tracking.wandb=offline"]]) == 0
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        assert set(json.loads(line)) - {"time", "step", "epoch"}, line


def test_throughput_counts_from_the_first_step(tmp_path, sst2_dir):
    """tokens/s is over the steps' own time: the Trainer's set-up before the first step (here a
    slow callback) is left out."""

    class SlowStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            time.sleep(2.0)

    cfg = build_config(overrides=["model.name=tiny-llama", f"data.data_dir={sst2_dir}",
                                  f"run.output_dir={tmp_path}", "train.max_steps=3",
                                  "train.batch_size=8", "train.precision=fp32"])  # fmt: skip
    summary = train(cfg, quiet=True, callbacks=[SlowStart()]).summary
    stepping = summary["tokens"]["real"] / summary["tokens_per_s"]["real"]
    assert 0 < stepping < 2.0, stepping  # three tiny steps, without the 2 s before them


def test_the_final_evaluation_records_the_dev_loss(tmp_path, sst2_dir):
    """SPEC §7's eval loss without periodic evaluations: the final one logs `eval/loss` (the
    Trainer's prediction loop's, over the dev set) and the summary keeps it as `eval_loss`."""
    import math

    args = _args(sst2_dir, tmp_path, "train.max_steps=2")
    assert main(["train", *[a for a in args if a != "tracking.wandb=offline"]]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert math.isfinite(summary["eval_loss"]) and 0.3 < summary["eval_loss"] < 3  # ~ln 2
    assert "loss" not in summary["metrics"]  # the task metrics alone (the report reads them)
    final = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if "eval/accuracy" in r]
    assert final[-1]["eval/loss"] == summary["eval_loss"] and final[-1]["step"] == 2
