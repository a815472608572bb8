"""`loralab study --status`: point states from hand-made trials and run directories, progress
from logs and checkpoints, stale workers, the compute estimate; nothing is created or changed."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from test_spec import _spec_file

from loralab.cli import main
from loralab.study.phases import phases
from loralab.study.progress import LENT_LOG, lent_threads, outside_training
from loralab.study.spec import load_spec
from loralab.study.status import study_status, sweep_status
from loralab.study.status_text import render
from loralab.study.storage import create_or_check, open_storage, storage_url


@pytest.fixture
def spec(tmp_path):
    return load_spec(_spec_file(tmp_path, ablations=None), str(tmp_path))


def _run_dir(res: Path, key: str, *, cpu_s=None, logged_step=None, checkpoint=None, max_steps=40,
             checkpoint_cpu_s=None, checkpoint_wall_s=None):  # fmt: skip
    run = res / "runs" / key
    run.mkdir(parents=True)
    if cpu_s is not None:
        (run / "summary.json").write_text(json.dumps({"status": "completed", "train_cpu_time_s": cpu_s}))  # fmt: skip
    if logged_step is not None:
        rows = [{"time": time.time() - 600, "step": 0, "efficiency/total": 1},
                {"time": time.time() - 30, "step": logged_step, "epoch": 0.1, "train/loss": 1.0}]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"time": 1, "st')  # fmt: skip
    if checkpoint is not None:
        ck = run / "checkpoints" / f"checkpoint-{checkpoint}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": checkpoint, "max_steps": max_steps}))  # fmt: skip
        if checkpoint_cpu_s is not None:
            times = {"train_cpu_time_s": checkpoint_cpu_s, "train_time_s": checkpoint_wall_s}
            (ck / "loralab_state.json").write_text(json.dumps({"loss_sum": 1.0, **times}))
        (run / "checkpoints" / "checkpoint-99").mkdir()  # being saved: no state yet, skipped


def _grid(spec, res: Path):
    """The sst2 grid study with: lora 1e-3 done, lora 3e-3 running (worker on this host gone),
    full 1e-4 done, full 3e-4 interrupted (re-enqueued after a failed attempt)."""
    st = open_storage(storage_url(None, res))
    ph = phases(spec, ["sst2"])[0]
    plan = ph.plan(spec, None, str(res))
    study = create_or_check(st, ph.study_name(spec.name), plan)
    trials = {t.user_attrs["point"]: t for t in study.get_trials()}
    keys = {(p["method"], p["lr"]): p["key"] for p in plan.points()}

    def finish(key, value):
        tid = trials[key]._trial_id
        st.set_trial_state_values(tid, TrialState.RUNNING)
        st.set_trial_state_values(tid, TrialState.COMPLETE, [value])

    finish(keys["lora", 1e-3], 0.8)
    _run_dir(res, keys["lora", 1e-3], cpu_s=100.0)
    finish(keys["full", 1e-4], 0.7)
    _run_dir(res, keys["full", 1e-4], cpu_s=300.0)
    st.set_trial_state_values(trials[keys["lora", 3e-3]]._trial_id, TrialState.RUNNING)
    st.set_trial_user_attr(trials[keys["lora", 3e-3]]._trial_id, "worker", {"host": "h1", "pid": 7})
    _run_dir(res, keys["lora", 3e-3], logged_step=20, checkpoint=10)
    (res / "logs").mkdir(exist_ok=True)
    (res / "logs" / f"{keys['lora', 3e-3]}.log").write_text(
        "\n=== 2026-12-03 05:00:00 train (trial 2) by {}\n"
        f"{LENT_LOG}2 threads (idle cores lent; others used 0.1 cores)\n"
    )
    lock = res / "locks" / f"{keys['lora', 3e-3]}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 1}))
    old = trials[keys["full", 3e-4]]
    st.set_trial_state_values(old._trial_id, TrialState.RUNNING)
    st.set_trial_user_attr(old._trial_id, "outcome", "interrupted")
    st.set_trial_state_values(old._trial_id, TrialState.FAIL)
    study.enqueue_trial({}, user_attrs=dict(old.user_attrs))
    retry = [t for t in study.get_trials() if t.state == TrialState.WAITING][0]
    st.set_trial_system_attr(retry._trial_id, "failed_trial", old.number)
    _run_dir(res, keys["full", 3e-4], checkpoint=30, checkpoint_cpu_s=225.0)
    return keys, lock


def test_without_storage_every_point_is_not_enqueued_and_nothing_is_created(tmp_path, spec):
    res = tmp_path / "res"
    status = study_status(spec, str(res))
    assert not res.exists()
    assert {p.state for p in status.points} == {"not enqueued"}
    assert len(status.points) == 4 + 4 + 2 + 2  # two grids, two seed phases
    assert [p.key.endswith("-lr<best>-s2") for p in status.points].count(True) == 4
    lines = render(status)
    assert lines[0].startswith("no study storage in") and lines[-1].startswith("total: 0/12 points")


def test_states_progress_stale_worker_and_estimate(tmp_path, spec):
    res = tmp_path / "res"
    keys, lock = _grid(spec, res)
    mtime = (res / "study.db").stat().st_mtime_ns
    (res / "study.db.lock").unlink()  # the creation lock: needed only while the tables are made
    status = study_status(spec, str(res), tasks=["sst2"])
    assert not (res / "study.db.lock").exists()
    by = {p.key: p for p in status.points}
    assert by[keys["lora", 1e-3]].state == "done" and by[keys["lora", 1e-3]].value == 0.8
    assert by[keys["lora", 1e-3]].cpu_s == 100.0 and by[keys["full", 1e-4]].cpu_s == 300.0
    running = by[keys["lora", 3e-3]]
    assert running.state == "running"
    assert running.progress == pytest.approx(0.5) and running.resumes_at == pytest.approx(0.25)
    assert 20 <= running.logged_ago_s < 120 and running.detail.startswith("stale")
    assert running.worker == "h1:7"
    assert running.lent_threads == 2 and by[keys["lora", 1e-3]].lent_threads is None
    interrupted = by[keys["full", 3e-4]]
    assert interrupted.state == "interrupted" and interrupted.resumes_at == pytest.approx(0.75)
    assert interrupted.resumes_cpu_s == 225.0 and running.resumes_cpu_s is None  # not recorded
    seeds = [p for p in status.points if p.phase.endswith("-seeds")]
    assert [p.state for p in seeds] == ["not enqueued"] * 2 and status.phases[1].waits_for_grid
    # spent: 100 + 300 finished, 225 up to the interrupted point's checkpoint; left: lora
    # running at 50% (100 x 0.5), full resumes at 75% (300 x 0.25), seeds 100 + 300
    assert status.estimate() == (pytest.approx(625.0), pytest.approx(525.0), 0)
    assert (res / "study.db").stat().st_mtime_ns == mtime  # looking changes nothing
    text = "\n".join(render(status))
    assert status.left_of(running) == pytest.approx(50.0)  # lora: 100 s, 50% logged
    assert status.left_of(interrupted) == pytest.approx(75.0)  # full: 300 s, 75% checkpointed
    assert "checkpoint at 75%; ~1 min of training CPU left" in text
    assert "on h1:7; 50% logged" in text and "checkpoint at 75%" in text and "2/4 done" in text
    assert "checkpoint at 25%; 2 threads (idle cores lent)" in text
    assert "training CPU time 10 min spent, ~9 min left for 4 points" in text
    assert "accuracy 0.8000; training CPU" in text  # no dev loss in that summary: none shown
    summary_file = res / "runs" / keys["lora", 1e-3] / "summary.json"
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "eval_loss": 0.4}))
    text = "\n".join(render(study_status(spec, str(res), tasks=["sst2"])))
    assert "accuracy 0.8000, dev loss 0.400; training CPU" in text

    # A worker holding the point's lock is alive: not stale.
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        held = study_status(spec, str(res), tasks=["sst2"])
        assert {p.key: p for p in held.points}[keys["lora", 3e-3]].detail == ""
    finally:
        os.close(fd)


def test_a_study_with_no_finished_point_yet_paces_its_wall_time_by_the_checkpoints(tmp_path, spec):  # fmt: skip
    """A long first point (SQuAD v2: hours): before any point finishes, the wall time left
    comes from the running point's checkpoint, 300 wall s for 200 training CPU s."""
    res = tmp_path / "res"
    st = open_storage(storage_url(None, res))
    ph = phases(spec, ["sst2"])[0]
    plan = ph.plan(spec, None, str(res))
    study = create_or_check(st, ph.study_name(spec.name), plan)
    key = next(p["key"] for p in plan.points() if p["method"] == "lora")
    trial = next(t for t in study.get_trials() if t.user_attrs["point"] == key)
    st.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
    st.set_trial_user_attr(trial._trial_id, "worker", {"host": "h1", "pid": 7})
    _run_dir(res, key, logged_step=20, checkpoint=20, checkpoint_cpu_s=200.0, checkpoint_wall_s=300.0)  # fmt: skip
    lock = res / "locks" / f"{key}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 1}))
    status = _with_live_worker(spec, res, lock)
    # 400 CPU s a LoRA point (200 at half way): 200 left here, then 400 for the other rate and
    # 400 for the seeds' LoRA point; full fine-tuning has no cost yet. At 1.5 wall s per CPU s.
    assert status.wall_left() == (pytest.approx(1500.0), 1)
    assert "(~25 min of wall time for the worker running now)" in render(status)[-1]


def test_a_running_point_shows_its_newest_dev_evaluation(tmp_path, spec):
    """A long point evaluates every few hundred steps: the status shows the newest result,
    found however many training lines (here ~200 KB of them) were logged after it."""
    res = tmp_path / "res"
    keys, _ = _grid(spec, res)
    metrics = res / "runs" / keys["lora", 3e-3] / "metrics.jsonl"
    evals = [{"time": 1, "step": s, "epoch": 0.1, "eval/loss": loss, "eval/accuracy": acc}
             for s, loss, acc in ((5, 0.693, 0.5), (10, 0.5, 0.75))]  # fmt: skip
    pad = {"time": 2, "step": 11, "epoch": 0.2, "train/loss": 1.0, "stats": "x" * 2000}
    lines = [json.dumps(r) for r in [*evals, *[pad] * 100]]
    metrics.write_text("\n".join(lines) + "\n" + metrics.read_text())
    status = study_status(spec, str(res), tasks=["sst2"])
    running = {p.key: p for p in status.points}[keys["lora", 3e-3]]
    assert running.last_eval == {"step": 10, "value": 0.75, "loss": 0.5}
    line = next(x for x in render(status) if keys["lora", 3e-3] in x)
    assert "accuracy 0.7500, dev loss 0.500 at step 10" in line
    # Before the first evaluation: nothing shown.
    assert {p.key: p for p in status.points}[keys["full", 3e-4]].last_eval is None


def _with_live_worker(spec, res, lock):
    """The status while a live worker holds the running point's lock (not stale)."""
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        return study_status(spec, str(res), tasks=["sst2"])
    finally:
        os.close(fd)


def test_wall_time_left_is_the_running_workers_schedule_at_the_finished_points_pace(tmp_path, spec):  # fmt: skip
    """With a live worker, the line adds the wall time its queue takes: the running point's
    rest, then the interrupted point, then the others, at the finished points' wall s per
    training CPU s. A stale worker (or none) adds nothing."""
    res = tmp_path / "res"
    keys, lock = _grid(spec, res)
    for key, wall_s in ((keys["lora", 1e-3], 150.0), (keys["full", 1e-4], 450.0)):  # CPU 100, 300
        path = res / "runs" / key / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "train_time_s": wall_s}))
    stale = study_status(spec, str(res), tasks=["sst2"])
    assert stale.wall_left() is None and "wall time" not in "\n".join(render(stale))
    status = _with_live_worker(spec, res, lock)
    # One worker: 50 s of its point left, then 75 + 100 + 300; 1.5 wall s per CPU s.
    assert status.wall_left() == (pytest.approx(525.0 * 1.5), 1)
    assert "~9 min left for 4 points (~13 min of wall time for the worker running now)" in render(status)[-1]  # fmt: skip
    # A worker between points (the running study's own, printing its progress) takes the next:
    # free at 0 and 50, the queue 75, 100, 300 ends at 75 + 300 = 375 s.
    assert status.wall_left(idle=1) == (pytest.approx(375.0 * 1.5), 2)
    # A point failed for good is not taken by anyone: the queue loses it.
    failed = next(p for p in status.points if p.state == "interrupted")
    failed.state = "failed"
    assert status.wall_left() == (pytest.approx((525.0 - 75.0) * 1.5), 1)


def test_wall_time_left_adds_each_points_start_up_and_final_evaluation(tmp_path, spec):
    """Finished points that record them: LoRA 10 s start-up and 20 s final evaluation, full
    30 s and 40 s. The running point pays its final evaluation; the others start anew and pay
    both. A resumed run's start-up is unknown (its wall time is its last attempt's)."""
    res = tmp_path / "res"
    keys, lock = _grid(spec, res)
    times = {keys["lora", 1e-3]: (150.0, 10.0, 20.0), keys["full", 1e-4]: (450.0, 30.0, 40.0)}
    for key, (train_s, setup, final) in times.items():  # CPU 100 and 300
        path = res / "runs" / key / "summary.json"
        timed = {"train_time_s": train_s, "eval_time_s": final, "wall_time_s": train_s + setup + final}  # fmt: skip
        path.write_text(json.dumps({**json.loads(path.read_text()), **timed}))
    status = _with_live_worker(spec, res, lock)
    # At 1.5 wall s per CPU s: running LoRA 50 x 1.5 + 20, interrupted full 75 x 1.5 + 30 + 40,
    # then the seeds: LoRA 100 x 1.5 + 10 + 20 and full 300 x 1.5 + 30 + 40.
    assert status.wall_left() == (pytest.approx(525.0 * 1.5 + 20 + 70 + 30 + 70), 1)
    summary = {"wall_time_s": 100.0, "train_time_s": 60.0, "eval_time_s": 15.0}
    assert outside_training(summary) == (25.0, 15.0)
    assert outside_training({**summary, "resumed_from": "checkpoint-50"}) == (None, 15.0)
    assert outside_training({"eval_time_s": 15.0}) == (None, 15.0)


def test_a_point_that_would_not_fit_in_memory_says_so_and_nothing_changes(tmp_path, spec, monkeypatch):  # fmt: skip
    import optuna
    from optuna.trial import create_trial

    res = tmp_path / "res"
    keys, _ = _grid(spec, res)
    st = open_storage(storage_url(None, res))
    earlier = optuna.create_study(storage=st, study_name="earlier")  # an earlier spec's peaks
    for method, peak in (("lora", 600), ("full", 900)):
        earlier.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={
            "point": method, "result": {"task": "sst2", "method": method, "peak_memory_mb": peak}}))  # fmt: skip
    study = optuna.load_study(
        study_name=phases(spec, ["sst2"])[0].study_name(spec.name), storage=st
    )
    running = next(t for t in study.get_trials() if t.state == TrialState.RUNNING)
    st.set_trial_user_attr(running._trial_id, "worker", {"host": socket.gethostname(), "pid": 1})
    st.record_heartbeat(running._trial_id)
    with sqlite3.connect(res / "study.db") as con:  # its worker died a day ago
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 day')")
    mtime = (res / "study.db").stat().st_mtime_ns
    monkeypatch.setenv("LORALAB_MEMORY_BUDGET_MB", "1500")
    # LoRA runs here holding 1.15 x 600 MB; full fine-tuning would need 1.15 x 900 beside it.
    by = {p.key: p for p in study_status(spec, str(res), tasks=["sst2"]).points}
    waiting = by[keys["full", 3e-4]]
    assert waiting.state == "interrupted"
    assert waiting.detail.startswith(
        "a free worker here would hold it back for memory: it needs 1.0 GB, 1 point(s) running here"
    )
    assert (res / "study.db").stat().st_mtime_ns == mtime  # stale, yet looking fails nothing
    monkeypatch.setenv("LORALAB_MEMORY_BUDGET_MB", "1800")  # room for both: nothing to say
    by = {p.key: p for p in study_status(spec, str(res), tasks=["sst2"]).points}
    assert by[keys["full", 3e-4]].detail == ""


def test_lent_threads_come_from_the_current_attempts_last_log_line(tmp_path):
    log = tmp_path / "p.log"
    lent = f"{LENT_LOG}2 threads (idle cores lent; others used 0.0 cores)\n"
    back = f"{LENT_LOG}1 threads (cores given back; others used 0.9 cores)\n"
    log.write_text("=== attempt 1\n" + lent + "step\n")
    assert lent_threads(log) == 2
    log.write_text("=== attempt 1\n" + lent + back)
    assert lent_threads(log) is None  # given back
    log.write_text("=== attempt 1\n" + lent + "=== attempt 2\nloading\n")
    assert lent_threads(log) is None  # an older attempt's line
    assert lent_threads(tmp_path / "missing.log") is None


def test_complete_grid_names_the_dependent_points(tmp_path, spec):
    res = tmp_path / "res"
    keys, _ = _grid(spec, res)
    st = open_storage(storage_url(None, res))
    import optuna

    study = optuna.load_study(study_name=f"{spec.name}-sst2-grid", storage=st)
    for t in study.get_trials():
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            if t.state == TrialState.WAITING:
                st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
            st.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [0.9])
    status = study_status(spec, str(res), tasks=["sst2"])
    grid, seeds = status.phases
    assert grid.best == {"lora": 3e-3, "full": 3e-4} and not seeds.waits_for_grid
    assert [p.key for p in seeds.points] == [
        "sst2-lora-tiny-llama-lr0.003-s2",
        "sst2-full-tiny-llama-lr0.0003-s2",
    ]
    # A finished run folder of a point not claimed yet costs nothing more: it will be reused.
    _run_dir(res, "sst2-full-tiny-llama-lr0.0003-s2", cpu_s=300.0)
    status = study_status(spec, str(res), tasks=["sst2"])
    reused = status.phases[1].points[1]
    assert reused.state == "not enqueued" and reused.detail.startswith("its run folder is finished")
    assert reused.reusable and reused.cpu_s == 300.0
    # spent: 100 + 300 (grid) + 300 (the reusable run); left: the lora seed point only
    assert status.estimate() == (pytest.approx(700.0), pytest.approx(100.0), 0)
    assert (
        "total: 4/6 points done (+1 to be reused from finished run folders)" in render(status)[-1]
    )


@pytest.mark.parametrize("stored", ["older rule", "other"])
def test_a_seeds_study_stored_under_an_older_rule_is_not_called_refused(tmp_path, spec, stored):
    """LoRA's two rates lie within a point of the majority baseline: the rule now ties them
    and the dev loss picks 1e-3; the seeds study was stored when 3e-3's higher score won. A
    worker goes on with the stored plan (`Runner`), so the status shows that plan, not a
    refusal; a stored plan no rule chose is still refused."""
    res = tmp_path / "res"
    st = open_storage(storage_url(None, res))
    grid_ph, seeds_ph = phases(spec, ["sst2"])[:2]
    grid_plan = grid_ph.plan(spec, None, str(res))
    study = create_or_check(st, grid_ph.study_name(spec.name), grid_plan)
    scores = {("lora", 1e-3): (0.499, 2.0), ("lora", 3e-3): (0.5, 3.0),
              ("full", 1e-4): (0.7, 1.0), ("full", 3e-4): (0.6, 1.0)}  # fmt: skip
    for t in study.get_trials():
        point = next(p for p in grid_plan.points() if p["key"] == t.user_attrs["point"])
        value, loss = scores[point["method"], point["lr"]]
        result = {"task": "sst2", "eval_loss": loss, "majority": {"accuracy": 0.5}}
        st.set_trial_user_attr(t._trial_id, "result", result)
        st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
        st.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [value])
    then = {"lora": 3e-3, "full": 1e-4} if stored == "older rule" else {"lora": 3e-3, "full": 3e-4}
    create_or_check(st, seeds_ph.study_name(spec.name), seeds_ph.plan(spec, then, str(res)))
    grid, seeds = study_status(spec, str(res), tasks=["sst2"]).phases[:2]
    assert grid.best == {"lora": 1e-3, "full": 1e-4}  # the rule now
    if stored == "older rule":
        assert seeds.refused == "" and seeds.best == then
        assert [p.key for p in seeds.points] == ["sst2-lora-tiny-llama-lr0.003-s2",
                                                 "sst2-full-tiny-llama-lr0.0001-s2"]  # fmt: skip
    else:
        assert "lrs" in seeds.refused


def test_cli_status_exit_0_and_excludes_dry_run(tmp_path, capsys):
    path = _spec_file(tmp_path, ablations=None)
    res = tmp_path / "res"
    argv = ["study", str(path), "--data-root", str(tmp_path), "--output-dir", str(res)]
    assert main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    assert "tiny-sst2-grid: 0/4 done" in out and "total: 0/12 points done" in out
    assert not res.exists()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--status", "--dry-run"])
    assert e.value.code == 2


def test_sweep_status_of_one_stored_study(tmp_path, spec, capsys):
    res = tmp_path / "res"
    keys, _ = _grid(spec, res)
    name = f"{spec.name}-sst2-grid"
    status = sweep_status(name, results_dir=str(res))
    want = {p.key: p.state for p in study_status(spec, str(res), tasks=["sst2"]).phases[0].points}
    assert {p.key: p.state for p in status.points} == want
    assert main(["sweep", "status", "--study", name, "--output-dir", str(res)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: 2/4 done") and "interrupted" in out
    assert main(["sweep", "status", "--output-dir", str(res)]) == 2  # no --study
    assert "give --study NAME" in capsys.readouterr().err
    assert main(["sweep", "status", "--study", name, "--output-dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # A task the study does not have is refused, as `sweep worker` does (was "0/0 done", 0).
    assert main(["sweep", "status", "--study", name, "--output-dir", str(res), "--tasks", "mrpc"]) == 2  # fmt: skip
    assert "--tasks mrpc: not in study" in capsys.readouterr().err


def test_a_task_with_no_run_gets_a_rough_cost_from_its_training_text(tmp_path, spec):
    """sst2 has finished points, mrpc none: mrpc is costed at sst2's CPU per character of
    training text, and the total says how many points that covers."""
    from conftest import write_mrpc, write_sst2

    from loralab.study.estimate import training_chars

    write_sst2(tmp_path / "glue" / "sst2")
    write_mrpc(tmp_path / "glue" / "mrpc", n=32)
    res = tmp_path / "res"
    _grid(spec, res)
    status = study_status(spec, str(res))
    configs = {ph.task: ph.config for ph in status.phases}
    sst2, mrpc = (training_chars(configs[t]) for t in ("sst2", "mrpc"))
    costs = status.costs()
    assert costs["mrpc", "lora"] == pytest.approx(100.0 / sst2 * mrpc)  # lora: 100 s on sst2
    assert costs["mrpc", "full"] == pytest.approx(300.0 / sst2 * mrpc)
    assert status.rough() == {("mrpc", "lora"), ("mrpc", "full")}
    mrpc_points = sum(p.task == "mrpc" for p in status.points)
    assert f"({mrpc_points} of them roughly" in render(status)[-1]


def test_a_grid_finished_only_in_run_folders_names_the_dependent_points(tmp_path, spec):
    """A spec extended under a new name has no stored grid yet, but its grid's run folders are
    finished: the lr a worker will pick from them names the dependent points, and those whose
    folders are finished too show as reused, not as training left."""
    res = tmp_path / "res"
    grid = phases(spec, ["sst2"])[0].plan(spec, None, str(res))
    values = {
        ("lora", 1e-3): 0.70,
        ("lora", 3e-3): 0.80,
        ("full", 1e-4): 0.75,
        ("full", 3e-4): None,
    }
    for p in grid.points():  # full 3e-4 diverged: the worst, so full's best is 1e-4
        acc = values[p["method"], p["lr"]]
        run = res / "runs" / p["key"]
        run.mkdir(parents=True)
        summary = {"status": "completed" if acc else "diverged", "task": "sst2",
                   "metrics": {"accuracy": acc} if acc else {}, "train_cpu_time_s": 60.0}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
    _run_dir(res, "sst2-lora-tiny-llama-lr0.003-s2", cpu_s=50.0)
    status = study_status(spec, str(res), tasks=["sst2"])
    assert not res.joinpath("study.db").exists()  # looking created nothing
    grid_status, seeds = status.phases
    assert grid_status.best == {"lora": 3e-3, "full": 1e-4} and not seeds.waits_for_grid
    assert [(p.key, p.reusable) for p in seeds.points] == [
        ("sst2-lora-tiny-llama-lr0.003-s2", True),
        ("sst2-full-tiny-llama-lr0.0001-s2", False),
    ]
    assert render(status)[-1].startswith("total: 0/6 points done (+5 to be reused")


def test_a_tie_in_run_folders_is_broken_by_their_dev_loss_as_a_worker_would(tmp_path, spec):
    """A grid finished only in run folders, LoRA's two rates tied on accuracy: their summaries'
    dev losses choose, as the trials a worker would record from them do; without the losses,
    the smaller rate."""
    res = tmp_path / "res"
    grid = phases(spec, ["sst2"])[0].plan(spec, None, str(res))
    loss = {1e-3: 0.5, 3e-3: 0.4, 1e-4: 0.7, 3e-4: 0.6}
    for p in grid.points():
        run = res / "runs" / p["key"]
        run.mkdir(parents=True)
        summary = {"status": "completed", "task": "sst2", "metrics": {"accuracy": 0.8},
                   "train_cpu_time_s": 60.0, "eval_loss": loss[p["lr"]]}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
    assert study_status(spec, str(res), tasks=["sst2"]).phases[0].best == {"lora": 3e-3, "full": 3e-4}  # fmt: skip
    for p in grid.points():
        summary = json.loads((res / "runs" / p["key"] / "summary.json").read_text())
        del summary["eval_loss"]
        (res / "runs" / p["key"] / "summary.json").write_text(json.dumps(summary))
    assert study_status(spec, str(res), tasks=["sst2"]).phases[0].best == {"lora": 1e-3, "full": 1e-4}  # fmt: skip


def test_an_unfinished_grid_counts_the_dependent_points_at_its_best_lr_so_far(tmp_path, spec):
    """A grid extended by an lr that has not run yet: the dependent points wait, but the best
    lr among the finished ones tells which of their finished run folders would be reused, and
    the estimate leaves those out (the keys keep `lr<best>`: the choice is not made)."""
    res = tmp_path / "res"
    grid = phases(spec, ["sst2"])[0].plan(spec, None, str(res))
    values = {("lora", 1e-3): 0.70, ("lora", 3e-3): 0.80, ("full", 1e-4): 0.75}
    for p in grid.points():  # full 3e-4 has not run: the grid is unfinished
        if (acc := values.get((p["method"], p["lr"]))) is not None:
            run = res / "runs" / p["key"]
            run.mkdir(parents=True)
            summary = {"status": "completed", "task": "sst2", "metrics": {"accuracy": acc},
                       "train_cpu_time_s": 60.0}  # fmt: skip
            (run / "summary.json").write_text(json.dumps(summary))
    _run_dir(res, "sst2-lora-tiny-llama-lr0.003-s2", cpu_s=50.0)
    _run_dir(res, "sst2-full-tiny-llama-lr0.0003-s2", cpu_s=70.0)  # not the best so far
    # Unfinished at the best so far: its checkpoint does not count while the lr is not chosen.
    _run_dir(res, "sst2-full-tiny-llama-lr0.0001-s2", logged_step=20, checkpoint=20, checkpoint_cpu_s=30.0)  # fmt: skip
    status = study_status(spec, str(res), tasks=["sst2"])
    grid_status, seeds = status.phases
    assert grid_status.best is None and seeds.waits_for_grid and seeds.best is None
    assert seeds.so_far == {"lora": 3e-3, "full": 1e-4}
    assert [(p.key, p.reusable) for p in seeds.points] == [
        ("sst2-lora-tiny-llama-lr<best>-s2", True),
        ("sst2-full-tiny-llama-lr<best>-s2", False),
    ]
    assert seeds.points[0].detail == "reused if the grid's best lr stays 0.003 (its run folder is finished)"  # fmt: skip
    assert (seeds.points[1].resumes_at, seeds.points[1].progress) == (None, None)
    # spent: 3 x 60 (grid) + 50 (the reusable seed point); left: full 3e-4 and full's seed
    # point at full's 60 s; lora's seed point costs nothing more
    assert status.estimate() == (pytest.approx(230.0), pytest.approx(120.0), 0)
    lines = render(status)
    assert "tiny-sst2-seeds: 0/2 done (waits for the grid's best lr; best so far lora 0.003, full 0.0001)" in lines  # fmt: skip
    assert lines[-1].startswith(
        "total: 0/6 points done (+4 to be reused from finished run folders) (where a grid is "
        "unfinished, at its best lr so far); training CPU time 4 min spent, ~2 min left for 2 points"
    )
    # With no finished lr for a method there is no best so far: nothing is counted as reused.
    for key in [p["key"] for p in grid.points() if p["method"] == "full"]:
        if (res / "runs" / key).exists():
            (res / "runs" / key / "summary.json").unlink()
    seeds = study_status(spec, str(res), tasks=["sst2"]).phases[1]
    assert seeds.so_far is None and not any(p.reusable for p in seeds.points)


def test_a_finished_points_start_time_comes_from_its_summary(tmp_path, spec):
    """`first_step_at` in summary.json dates a finished point, so the estimate can prefer the
    newest points (`estimate.newest`); a summary without it leaves the point undated."""
    res = tmp_path / "res"
    grid = phases(spec, ["sst2"])[0].plan(spec, None, str(res))
    keys = [p["key"] for p in grid.points()]
    for i, key in enumerate(keys[:2]):
        run = res / "runs" / key
        run.mkdir(parents=True)
        summary = {"status": "completed", "train_cpu_time_s": 60.0, "task": "sst2",
                   "metrics": {"accuracy": 0.5}, "first_step_at": 1.7e9 if i else "garbled"}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
    by = {p.key: p for p in study_status(spec, str(res), tasks=["sst2"]).points}
    assert (by[keys[0]].started_at, by[keys[1]].started_at) == (None, 1.7e9)


def test_an_axis_seeds_phase_waits_for_each_values_best_on_the_axis_grid(tmp_path):
    """An axis grid on its first seed (`grid_on_first_seed`): its other seeds wait for each
    value's best lr, shown so far from the finished run folders, then run each at its own."""
    axes = [{"lora.alpha": [16, 64], "lr": [1e-3, 3e-3], "seeds": [1, 2]}, {"lora.r": [4, 8]}]
    spec = load_spec(_spec_file(tmp_path, ablations=axes), str(tmp_path))
    res = tmp_path / "res"

    def finished(key: str, acc: float) -> None:
        (res / "runs" / key).mkdir(parents=True)
        summary = {"status": "completed", "task": "sst2", "metrics": {"accuracy": acc}, "train_cpu_time_s": 60.0}  # fmt: skip
        (res / "runs" / key / "summary.json").write_text(json.dumps(summary))

    finished("sst2-lora-tiny-llama-lr0.001-s1", 0.70)  # the base: the task's grid runs
    finished("sst2-lora-tiny-llama-lr0.003-s1", 0.80)
    finished("sst2-full-tiny-llama-lr0.0001-s1", 0.75)
    finished("sst2-full-tiny-llama-lr0.0003-s1", 0.72)
    finished("sst2-lora-tiny-llama-lr0.001-s1-a64", 0.75)  # 3e-3 has not run
    status = study_status(spec, str(res), tasks=["sst2"])
    names = [ph.name for ph in status.phases]
    assert names == ["tiny-sst2-grid", "tiny-sst2-seeds", "tiny-sst2-ablate-alpha", "tiny-sst2-ablate-alpha-seeds", "tiny-sst2-ablate-rank"]  # fmt: skip
    # The task's seeds run both methods at their best; the rank axis, LoRA only, shows LoRA's.
    assert status.phases[1].best == {"lora": 3e-3, "full": 1e-4}
    assert status.phases[4].best == {"lora": 3e-3}
    axis, later = status.phases[2:4]
    assert (
        axis.best is None and later.waits_for_grid and later.so_far == {"base": 3e-3, "a64": 1e-3}
    )
    assert [p.key for p in later.points] == ["sst2-lora-tiny-llama-lr<best>-s2-a64", "sst2-lora-tiny-llama-lr<best>-s2"]  # fmt: skip
    line = "tiny-sst2-ablate-alpha-seeds: 0/2 done (waits for each setting's best lr on the axis's first seed; best so far base 0.003, a64 0.001)"  # fmt: skip
    assert line in render(status)
    # Had alpha 64 diverged at both rates, its other seed would not run, and status says so.
    (res / "runs" / "sst2-lora-tiny-llama-lr0.001-s1-a64" / "summary.json").write_text(json.dumps({"status": "diverged", "task": "sst2", "metrics": {}}))  # fmt: skip
    diverged = {"status": "diverged", "task": "sst2", "metrics": {}}
    (res / "runs" / "sst2-lora-tiny-llama-lr0.003-s1-a64").mkdir()
    (res / "runs" / "sst2-lora-tiny-llama-lr0.003-s1-a64" / "summary.json").write_text(
        json.dumps(diverged)
    )
    status = study_status(spec, str(res), tasks=["sst2"])
    axis, later = status.phases[2:4]
    assert axis.best == {"base": 3e-3, "a64": None}
    assert [p.key for p in later.points] == ["sst2-lora-tiny-llama-lr0.003-s2"]
    assert "tiny-sst2-ablate-alpha: 0/4 done · best lr base 0.003, a64 diverged at every rate" in render(status)  # fmt: skip
    for rate in ("0.001", "0.003"):
        (res / "runs" / f"sst2-lora-tiny-llama-lr{rate}-s1-a64" / "summary.json").unlink()
        (res / "runs" / f"sst2-lora-tiny-llama-lr{rate}-s1-a64").rmdir()
    finished("sst2-lora-tiny-llama-lr0.001-s1-a64", 0.75)
    finished("sst2-lora-tiny-llama-lr0.003-s1-a64", 0.60)  # the axis grid is complete
    axis, later = study_status(spec, str(res), tasks=["sst2"]).phases[2:4]
    assert axis.best == {"base": 3e-3, "a64": 1e-3} and not later.waits_for_grid
    assert [p.key for p in later.points] == ["sst2-lora-tiny-llama-lr0.001-s2-a64", "sst2-lora-tiny-llama-lr0.003-s2"]  # fmt: skip


def test_the_estimate_counts_other_machines_points_at_this_ones_speed(tmp_path, spec):
    """Each finished point's machine comes from its summary; a (task, method) that this machine
    has not run costs the others' time times how much slower it ran what both ran."""
    from loralab.tracking import hardware, machine_name

    here = machine_name(hardware())
    res = tmp_path / "res"
    for key, cpu, machine in (("sst2-lora-tiny-llama-lr0.001-s1", 100.0, "Other[avx2]"),
                              ("sst2-lora-tiny-llama-lr0.003-s1", 300.0, here),
                              ("sst2-full-tiny-llama-lr0.0001-s1", 200.0, "Other[avx2]")):  # fmt: skip
        (res / "runs" / key).mkdir(parents=True)
        summary = {"status": "completed", "task": "sst2", "metrics": {"accuracy": 0.7},
                   "train_cpu_time_s": cpu, "hardware": {"cpu": machine, "accelerator": None}}  # fmt: skip
        (res / "runs" / key / "summary.json").write_text(json.dumps(summary))
    status = study_status(spec, str(res), tasks=["sst2"])
    assert status.here == here
    ran = {p.key: p.machine for p in status.points if p.machine}
    assert ran["sst2-full-tiny-llama-lr0.0001-s1"] == "Other[avx2]"
    # Here ran sst2 LoRA 3x slower than Other did (300 against 100): full's 200 s count 600.
    assert status.costs() == {("sst2", "lora"): pytest.approx(300.0), ("sst2", "full"): pytest.approx(600.0)}  # fmt: skip


def test_a_point_running_on_another_host_is_not_costed_at_this_machines_speed():
    from loralab.study.status import PhaseStatus, PointStatus, StudyStatus

    def pt(key, state, machine=None, worker=None, cpu_s=None, progress=None, task="sst2"):
        return PointStatus("p", key, task, "lora", state, "accuracy", cpu_s=cpu_s, machine=machine,
                           worker=worker, progress=progress)  # fmt: skip

    points = [pt("a", "done", "Other", cpu_s=100.0), pt("b", "done", "Here", cpu_s=300.0),
              pt("c", "done", "Other", cpu_s=900.0, task="mrpc"),
              pt("d", "running", worker=f"elsewhere-{os.getpid()}:1", progress=0.5, task="mrpc"),
              pt("e", "running", worker=f"{socket.gethostname()}:1", progress=0.5, task="mrpc")]  # fmt: skip
    status = StudyStatus(
        "res", None, [PhaseStatus("p", "sst2", "grid", True, points=points)], "Here"
    )
    # Here ran sst2 3x slower than Other: MRPC's 900 s count 2,700 here. A point running on
    # another host costs what any machine's points did (900), whatever this machine's speed.
    assert status.left_of(points[4]) == pytest.approx(2700.0 * 0.5)
    assert status.left_of(points[3]) == pytest.approx(900.0 * 0.5)


def test_a_status_of_some_tasks_takes_machine_speeds_from_the_others_too(tmp_path, spec):
    """`--tasks mrpc`: this machine's speed against another's shows on SST-2 alone; the MRPC
    points are still costed at this machine's speed, and only MRPC's phases are shown."""
    from loralab.tracking import hardware, machine_name

    here = machine_name(hardware())
    res = tmp_path / "res"
    for key, task, cpu, machine in (("sst2-lora-tiny-llama-lr0.001-s1", "sst2", 100.0, "Other[avx2]"),
                                    ("sst2-lora-tiny-llama-lr0.003-s1", "sst2", 300.0, here),
                                    ("mrpc-lora-tiny-llama-lr0.001-s1", "mrpc", 200.0, "Other[avx2]")):  # fmt: skip
        (res / "runs" / key).mkdir(parents=True)
        summary = {"status": "completed", "task": task, "metrics": {"accuracy": 0.7},
                   "train_cpu_time_s": cpu, "hardware": {"cpu": machine, "accelerator": None}}  # fmt: skip
        (res / "runs" / key / "summary.json").write_text(json.dumps(summary))
    status = study_status(spec, str(res), tasks=["mrpc"])
    assert {ph.task for ph in status.phases} == {"mrpc"} and {p.task for p in status.points} == {
        "mrpc"
    }
    assert status.costs()[("mrpc", "lora")] == pytest.approx(600.0)  # 200 s x (300 / 100)


def test_sweep_status_gives_each_tasks_own_best_lr(tmp_path):
    """A sweep over two tasks showed one best lr, from dev values averaged over both tasks (and
    metric scales): SST-2's best is 1e-4, MRPC's 3e-4, and the pooled mean picked 3e-4."""
    from optuna.trial import TrialState

    from loralab.study.grid import make_plan
    from loralab.study.status import sweep_status
    from loralab.study.status_text import render
    from loralab.study.storage import create_or_check, open_storage

    res = tmp_path / "res"
    res.mkdir()
    plan = make_plan(tasks="sst2,mrpc", methods="lora", lora_lr="1e-4,3e-4", seeds="1",
                     model={"name": "tiny-llama"}, results_dir=str(res))  # fmt: skip
    st = open_storage(f"sqlite:///{res / 'study.db'}")
    study = create_or_check(st, "sw", plan)
    value = {("sst2", 1e-4): 0.90, ("sst2", 3e-4): 0.80, ("mrpc", 1e-4): 0.60, ("mrpc", 3e-4): 0.75}
    points = {p["key"]: p for p in plan.points()}
    for t in study.get_trials():
        p = points[t.user_attrs["point"]]
        st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
        st.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [value[p["task"], p["lr"]]])
    status = sweep_status("sw", None, str(res))
    assert status.phases[0].best == {"sst2 lora": 1e-4, "mrpc lora": 3e-4}
    assert "best lr sst2 lora 0.0001, mrpc lora 0.0003" in render(status)[0]


def test_the_progress_line_counts_the_workers_started_here():
    """Two workers started together: the first to print (a sibling not running yet) counts
    two, not one (it gave one worker's wall time for the whole study)."""
    from types import SimpleNamespace as P

    from loralab.study.runner import idle_here

    running = [P(state="running", worker="box:11"), P(state="running", worker="far:7"),
               P(state="done", worker=None)]  # fmt: skip
    assert idle_here([], 2, "box") == 2  # the sibling has not claimed a point yet
    assert idle_here(running, 2, "box") == 1  # it runs one: the asking worker alone is idle
    assert idle_here(running, 1, "box") == 1  # never fewer than the one asking
    assert idle_here(running[1:], 3, "box") == 3  # another machine's workers are not ours
