"""Memory-aware claiming: a point starts only if its predicted peak fits beside the running ones."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from loralab.errors import LoralabError
from loralab.study import memory
from loralab.study.storage import open_storage
from loralab.study.worker import Worker


def test_budget_from_the_environment_or_the_machine(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "12000")
    assert memory.budget_mb() == 12000
    monkeypatch.setenv(memory.BUDGET_ENV, "0")
    assert memory.budget_mb() is None  # off
    monkeypatch.setenv(memory.BUDGET_ENV, "lots")
    with pytest.raises(LoralabError, match=memory.BUDGET_ENV):
        memory.budget_mb()
    monkeypatch.delenv(memory.BUDGET_ENV)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # a worker pinned to a GPU: no check
    assert memory.budget_mb() is None
    monkeypatch.setenv(memory.BUDGET_ENV, "9000")  # unless asked for
    assert memory.budget_mb() == 9000
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv(memory.BUDGET_ENV)
    with open("/proc/meminfo") as f:
        total_mb = int(f.readline().split()[1]) / 1024
    monkeypatch.setattr(memory, "_cgroup_limit", lambda: float("inf"))
    assert memory.budget_mb() == pytest.approx(0.9 * total_mb)
    monkeypatch.setattr(memory, "_cgroup_limit", lambda: 4 * 2**30)  # a 4 GiB container
    assert memory.budget_mb() == pytest.approx(0.9 * min(total_mb, 4096))


def test_fits():
    assert memory.fits(None, [], 1000)  # nothing runs here: anything starts
    assert memory.fits(900, [50], None)  # no budget: no check
    assert memory.fits(500, [500], 1000) and not memory.fits(501, [500], 1000)
    assert not memory.fits(None, [10], 1000)  # unknown size waits for the host to be free
    assert not memory.fits(10, [None], 1000)  # so does anything beside one of unknown size


def _trial(task, method, peak, allocator=None):
    return SimpleNamespace(user_attrs={"result": {
        "task": task, "method": method, "peak_memory_mb": peak, "allocator": allocator}})  # fmt: skip


def test_reservation_is_the_largest_finished_peak_of_its_task_and_method_plus_a_margin():
    peaks = memory.history([_trial("rte", "full", 9000), _trial("rte", "full", 10000),
                            _trial("rte", "lora", 6000), SimpleNamespace(user_attrs={})])  # fmt: skip
    assert peaks == {("rte", "full"): 10000, ("rte", "lora"): 6000}
    assert memory.reservation({"task": "rte", "method": "lora"}, peaks) == memory.MARGIN * 6000
    assert memory.reservation({"task": "rte"}, peaks) is None  # enqueued without its method
    assert memory.reservation({"task": "squad_v2", "method": "lora"}, peaks) is None


def test_peaks_under_this_workers_allocator_count_alone_where_there_are_some():
    trials = [_trial("rte", "lora", 10000), _trial("rte", "lora", 7000, "tcmalloc"),
              _trial("rte", "full", 12000), _trial("rte", "full", 9000, "jemalloc")]  # fmt: skip
    assert memory.history(trials, "tcmalloc") == {("rte", "lora"): 7000, ("rte", "full"): 12000}
    assert memory.history(trials, "system") == {("rte", "lora"): 10000, ("rte", "full"): 12000}
    assert memory.history(trials) == {("rte", "lora"): 10000, ("rte", "full"): 12000}


def test_a_task_with_one_method_finished_predicts_the_other():
    # SmolLM2-135M's measured peaks (MB): SST-2 LoRA 2,630 / full 4,400 (ratio 1.67), MRPC
    # 5,200 / 7,200 (1.38); SQuAD v2 has LoRA only, RTE full only.
    peaks = memory.predict({("sst2", "lora"): 2630, ("sst2", "full"): 4400,
                            ("mrpc", "lora"): 5200, ("mrpc", "full"): 7200,
                            ("squad_v2", "lora"): 8700, ("rte", "full"): 8700})  # fmt: skip
    assert peaks["squad_v2", "full"] == pytest.approx(8700 * 4400 / 2630)  # the larger ratio
    assert peaks["rte", "lora"] == 8700  # LoRA needs no more than full on the same batches
    assert peaks.predicted == {("squad_v2", "full"), ("rte", "lora")}
    assert peaks["sst2", "full"] == 4400  # measured peaks are kept as they are
    # No task with both methods: nothing to scale LoRA by, full stays unknown.
    alone = memory.predict({("squad_v2", "lora"): 8700})
    assert ("squad_v2", "full") not in alone and alone.predicted == frozenset()
    assert memory.reservation({"task": "squad_v2", "method": "full"}, alone) is None


def test_a_predicted_point_waits_for_memory_and_says_it_was_predicted():
    peaks = memory.predict({("sst2", "lora"): 2000, ("sst2", "full"): 3000,
                            ("squad_v2", "lora"): 8000})  # fmt: skip
    said: list[str] = []
    worker = SimpleNamespace(say=said.append, points={}, said_waits=set())
    attrs = {"point": "squad-full", "task": "squad_v2", "method": "full"}
    running = [memory.MARGIN * 8000]  # a SQuAD v2 LoRA point runs here
    # Full is predicted at 1.5 x 8,000 = 12,000 MB, plus the margin: 13,800 + 9,200 > 20,000.
    assert memory.waits(worker, attrs, peaks, running, 20000)
    assert said == [
        "squad-full waits for memory: it needs 13.5 GB (predicted from its task's runs of the "
        "other method), 1 point(s) running here (1 holding 9.0 GB), budget 19.5 GB "
        f"({memory.BUDGET_ENV} sets it; 0 turns the check off)"
    ]
    assert not memory.waits(worker, attrs, peaks, running, 23100)  # 13,800 + 9,200 fit
    # Measured peaks alone (no prediction) leave it unknown: it would wait for a free host.
    measured = {k: v for k, v in peaks.items() if k not in peaks.predicted}
    assert memory.waits(worker, {**attrs, "point": "x"}, measured, running, 23100)
    assert "unknown amount" in said[-1]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeat API
def test_a_worker_skips_a_point_that_would_not_fit_and_takes_one_that_does(tmp_path, monkeypatch):
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=60, grace=120)
    done = optuna.create_study(storage=st, study_name="earlier")  # another study's history
    for task, method, peak in (("squad_v2", "full", 9000), ("sst2", "lora", 2000)):
        done.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={
            "point": f"{task}-{method}", "result": {"task": task, "method": method, "peak_memory_mb": peak}}))  # fmt: skip
    study = optuna.create_study(storage=st, study_name="now")
    for key, task, method in (("running", "squad_v2", "full"), ("big", "squad_v2", "full"),
                              ("small", "sst2", "lora"), ("new", "rte", "lora")):  # fmt: skip
        study.enqueue_trial({}, user_attrs={"point": key, "task": task, "method": method})
    running = study.get_trials()[0]
    st.record_heartbeat(running._trial_id)
    assert st.set_trial_state_values(running._trial_id, TrialState.RUNNING)  # another worker's

    # A point of an earlier study whose worker died long ago (stale heartbeat) reserves nothing.
    dead = done.enqueue_trial(
        {}, user_attrs={"point": "dead", "task": "squad_v2", "method": "full"}
    )
    dead = done.get_trials()[-1]
    st.record_heartbeat(dead._trial_id)
    assert st.set_trial_state_values(dead._trial_id, TrialState.RUNNING)
    _age_heartbeat(tmp_path / "study.db", dead._trial_id)

    said: list[str] = []
    # "small" was enqueued without its method (older loralab): the worker's plan supplies it.
    small = study.get_trials()[2]
    st.set_trial_user_attr(small._trial_id, "method", None)
    points = {"small": {"method": "lora"}}
    worker = SimpleNamespace(storage=st, study_id=study._study_id, tasks=None, say=said.append, said_waits=set(),
                             points=points, results_dir=tmp_path)  # fmt: skip
    monkeypatch.setenv(memory.BUDGET_ENV, "16000")
    # 1.15 x 9,000 MB runs; the other SQuAD point would need as much again: only SST-2 fits.
    assert Worker._claim(worker).user_attrs["point"] == "small"
    assert Worker._claim(worker) is None  # RTE has no finished run to predict it: it waits too
    assert any(s.startswith("big waits for memory") and "16000" not in s for s in said)
    assert any(s.startswith("new waits for memory") and "unknown" in s for s in said)
    assert len(said) == 2  # each waiting point is announced once
    monkeypatch.setenv(memory.BUDGET_ENV, "0")  # the check turned off
    assert Worker._claim(worker).user_attrs["point"] == "big"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeat API
@pytest.mark.parametrize("status", ["completed", "diverged", "running"])
def test_a_point_whose_run_folder_is_finished_is_claimed_without_waiting_for_memory(
    tmp_path, monkeypatch, status
):
    """A grid extended under a new study name re-enqueues finished points, which a claim reuses
    without training: they need no memory, and must not wait behind a big running point."""
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=60, grace=120)
    study = optuna.create_study(storage=st, study_name="v2")
    for key in ("running", "old"):
        study.enqueue_trial({}, user_attrs={"point": key, "task": "squad_v2", "method": "full"})
    running = study.get_trials()[0]
    st.record_heartbeat(running._trial_id)
    assert st.set_trial_state_values(running._trial_id, TrialState.RUNNING)  # another worker's
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": status}))
    said: list[str] = []
    worker = SimpleNamespace(storage=st, study_id=study._study_id, tasks=None, say=said.append, said_waits=set(),
                             points={}, results_dir=tmp_path)  # fmt: skip
    monkeypatch.setenv(memory.BUDGET_ENV, "1000")  # nothing unknown fits beside the running one
    claimed = Worker._claim(worker)
    if status == "running":  # an unfinished folder trains (or resumes): it waits
        assert claimed is None and said and said[0].startswith("old waits for memory")
    else:
        assert claimed.user_attrs["point"] == "old" and said == []


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeat API
def test_state_between_polls_sees_points_finish_and_studies_appear(tmp_path):
    # memory.state keeps its Study objects between calls (finished trials are read once): a
    # point that finishes, and a study created after the first call, must still be seen.
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=60, grace=120)
    study = optuna.create_study(storage=st, study_name="grid")
    study.enqueue_trial({}, user_attrs={"point": "p", "task": "rte", "method": "lora"})
    tid = study.get_trials()[0]._trial_id
    st.record_heartbeat(tid)
    assert st.set_trial_state_values(tid, TrialState.RUNNING)
    assert memory.state(st) == ({}, [None])  # running, size unknown
    st.set_trial_user_attr(tid, "result", {"task": "rte", "method": "lora", "peak_memory_mb": 5000})
    assert st.set_trial_state_values(tid, TrialState.COMPLETE, values=[0.6])
    peaks, reserved = memory.state(st)
    assert peaks == {("rte", "lora"): 5000} and reserved == []
    later = optuna.create_study(storage=st, study_name="seeds")
    later.add_trial(create_trial(state=TrialState.COMPLETE, value=0.7, user_attrs={
        "point": "q", "result": {"task": "rte", "method": "full", "peak_memory_mb": 8000}}))  # fmt: skip
    peaks, _ = memory.state(st)
    assert peaks == {("rte", "lora"): 5000, ("rte", "full"): 8000} and not peaks.predicted


def _age_heartbeat(db, trial_id: int) -> None:
    import sqlite3

    with sqlite3.connect(db) as con:
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 day') "
                    "WHERE trial_id = ?", (trial_id,))  # fmt: skip


# -- this machine's record of finished points' peaks, by configuration --------------------------


def test_the_machine_record_fills_what_the_storage_has_not_measured(monkeypatch):
    monkeypatch.setattr(memory, "MACHINE_FILE", "study-peaks-unit.json")  # this test's alone
    monkeypatch.setattr(memory, "_local", lambda key: f"{key} here")
    attrs = {"task": "squad_v2", "method": "full", "memory_key": "k1"}
    assert memory.recorded() == {}
    memory.remember(attrs, {"peak_memory_mb": 9000.0})
    memory.remember(attrs, {"peak_memory_mb": 8000.0})  # a smaller peak keeps the larger one
    memory.remember({**attrs, "memory_key": None}, {"peak_memory_mb": 5.0})  # no key: nothing
    memory.remember({**attrs, "memory_key": "k2"}, {"status": "failed"})  # no peak: nothing
    machine = memory.recorded()
    assert machine == {"k1 here": 9000.0}
    # Nothing in the storage: the record's peak, and the sentence says where it comes from.
    assert memory.reservation(attrs, memory.Peaks(), machine) == memory.MARGIN * 9000
    assert memory.reservation({**attrs, "memory_key": "other"}, memory.Peaks(), machine) is None
    # A peak the storage measured for the task and method comes first ...
    measured = memory.predict({("squad_v2", "full"): 12000, ("squad_v2", "lora"): 8000})
    assert memory.reservation(attrs, measured, machine) == memory.MARGIN * 12000
    # ... and the record before a prediction from the other method.
    predicted = memory.predict({("sst2", "lora"): 2000, ("sst2", "full"): 3000,
                                ("squad_v2", "lora"): 8000})  # fmt: skip
    assert predicted["squad_v2", "full"] == 12000
    assert memory.reservation(attrs, predicted, machine) == memory.MARGIN * 9000
    predicted.machine = machine
    why = memory.why_waits(attrs, predicted, [memory.MARGIN * 8000], 15000)
    assert "10.1 GB (as its configuration peaked in an earlier study on this machine)" in why


def test_the_record_is_kept_apart_per_cpu_allocator_and_torch(monkeypatch):
    import torch

    from loralab import probecache

    monkeypatch.setattr(probecache, "machine", lambda: "Xeon[amx_bf16]")
    here = memory._local("k")
    assert here == f"k Xeon[amx_bf16] {memory.allocator.current()} torch {torch.__version__}"
    monkeypatch.setattr(probecache, "machine", lambda: "EPYC[avx2]")
    assert memory._local("k") != here


def test_a_setting_s_points_share_a_memory_key_that_other_settings_do_not(tmp_path):
    from loralab.config import build_config
    from loralab.study.grid import memory_key

    base = ["model.name=tiny-llama", "data.task=sst2", "train.batch_size=8"]
    key = memory_key(build_config(overrides=[*base, "train.lr=1e-3", "train.seed=1"]))
    # Another rate, seed, run folder or tracking: the same peak.
    same = [*base, "train.lr=3e-3", "train.seed=2", f"run.output_dir={tmp_path}", "run.name=x",
            "tracking.wandb=offline", "tracking.log_every=7"]  # fmt: skip
    assert memory_key(build_config(overrides=same)) == key
    for other in ("train.batch_size=16", "lora.r=16", "data.max_length=64", "train.method=full",
                  "model.name=tiny-bert"):  # fmt: skip
        assert memory_key(build_config(overrides=[*base, other])) != key, other


def test_a_study_s_finished_points_leave_their_peaks_for_the_next_study(tmp_path, monkeypatch):
    import yaml
    from conftest import write_sst2

    from loralab.cli import main

    monkeypatch.setattr(memory, "MACHINE_FILE", "study-peaks-e2e.json")  # this test's alone
    data = tmp_path / "data"
    write_sst2(data / "glue" / "sst2")
    spec = yaml.safe_load((Path(__file__).parents[2] / "configs/studies/tiny.yaml").read_text())
    spec.update(lr={"lora": [1.0e-3], "full": [1.0e-4]}, seeds=[1], ablations=[])
    spec["base"]["train"]["max_steps"] = 10
    spec_file = tmp_path / "two-points.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    args = ["study", str(spec_file), "--data-root", str(data), "--tasks", "sst2", "--quiet"]
    assert main([*args, "--output-dir", str(tmp_path / "first")]) == 0
    st = open_storage(f"sqlite:///{tmp_path / 'first' / 'study.db'}", heartbeat=60, grace=120)
    (study,) = [optuna.load_study(study_name=s.study_name, storage=st) for s in st.get_all_studies()]  # fmt: skip
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    machine = memory.recorded()
    assert len(done) == 2 and len(machine) == 2
    for t in done:
        peak = t.user_attrs["result"]["peak_memory_mb"]
        assert machine[memory._local(t.user_attrs["memory_key"])] == peak > 0
    # The same points planned for a new study (another folder and storage, nothing measured
    # there yet) carry the same keys: they reserve what they peaked at here, not all the budget.
    from loralab.study.grid import memory_key
    from loralab.study.phases import phases
    from loralab.study.spec import load_spec

    loaded = load_spec(spec_file, str(data))
    (grid,) = [ph for ph in phases(loaded, ["sst2"]) if ph.study_name("x").endswith("grid")]
    plan = grid.plan(loaded, None, str(tmp_path / "second"))
    keys = {memory_key(plan.config_for(p)) for p in plan.points()}
    assert keys == {t.user_attrs["memory_key"] for t in done}
