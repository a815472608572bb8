"""A study's SQLite file replaced under a running worker (as `git stash` of a committed
study.db does) is a fault at a file boundary: one clear paragraph and exit 2, never a traceback,
and the finished run folder is kept (a re-run reuses it)."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import write_sst2

from loralab.cli import main
from loralab.errors import LoralabError


def test_a_study_db_replaced_under_a_sweep_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from loralab.study.worker import Worker

    real = Worker._run_point

    def run_point(self, trial, point, lease):
        out = real(self, trial, point, lease)
        db = self.results_dir / "study.db"
        shutil.copy(db, db.with_name("copy.db"))
        os.replace(db.with_name("copy.db"), db)  # a new file under the open connection
        return out

    monkeypatch.setattr(Worker, "_run_point", run_point)
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    argv = ["sweep", "--model", "tiny-llama", "--data-dir", str(data), "--output-dir",
            str(tmp_path / "res"), "--methods", "lora", "--lora-lr", "1e-3", "--seeds", "1",
            "--quiet", "--heartbeat", "1", "--grace", "3",  # the re-run retries the point soon
            "train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=32"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab: error: The study's SQLite storage could not be written")
    assert "Traceback" not in err
    (run,) = (tmp_path / "res" / "runs").iterdir()
    assert (run / "summary.json").is_file()  # kept
    monkeypatch.setattr(Worker, "_run_point", real)
    assert main(argv) == 0  # the same command continues: the finished point is reused
    assert "1 reused" in capsys.readouterr().out


def _idle_worker(monkeypatch, tmp_path, seen: list[dict]):
    """A worker with nothing to claim whose points' states come from `seen` in turn (the last
    repeats); returns it with the list of states it was shown."""
    from types import SimpleNamespace

    from loralab.study import worker as w

    shown: list[dict] = []

    class Idle:
        study, plan, tasks, storage = SimpleNamespace(study_name="s"), None, None, None
        results_dir, poll, quiet, bar = tmp_path, 0.0, True, None
        report = w.WorkerReport("s", tmp_path)
        _finished = w.Worker._finished

        def states(self):
            shown.append(seen[min(len(shown), len(seen) - 1)])
            return shown[-1]

        def _claim(self):
            return None

    for name in ("ensure_enqueued", "fail_dead"):
        monkeypatch.setattr(w, name, lambda *a: None)
    monkeypatch.setattr(w, "point_states", lambda *a: shown[-1])
    return w.Worker.run(Idle()), shown


def test_a_worker_looks_again_at_a_point_it_saw_failed_before_leaving(monkeypatch, tmp_path):
    """Optuna fails a dead worker's trial, then enqueues its retry: a worker that reads the
    states between the two must not leave with the point unfinished (a flake under load)."""
    # Two looks set up the progress bar; then the point is seen failed, its retry, its end.
    seen = [{"p": "active"}] * 2 + [{"p": "failed"}, {"p": "active"}, {"p": "done"}]
    report, shown = _idle_worker(monkeypatch, tmp_path, seen)
    assert len(shown) == 5 and report.unfinished == []
    # A point failed for good: one more look, then the worker leaves and says so.
    report, shown = _idle_worker(monkeypatch, tmp_path, [{"p": "failed"}])
    assert len(shown) == 4 and report.unfinished == ["p"]


def test_a_study_left_without_its_grid_by_a_killed_creator_is_taken_by_the_next(tmp_path, monkeypatch):  # fmt: skip
    """Killed between `create_study` and storing the grid: the empty study is the next creator's
    to take; one that holds trials but no grid is another tool's, and is refused."""
    import optuna

    from loralab.study import storage as storage_mod
    from loralab.study.grid import make_plan
    from loralab.study.storage import create_or_check, load_study, open_storage

    monkeypatch.setattr(storage_mod.time, "sleep", lambda s: None)  # the wait for a slow creator
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    plan = make_plan(tasks="sst2", methods="lora", lora_lr="1e-4", seeds="1,2",
                     results_dir=str(tmp_path), model={"name": "tiny-llama"})  # fmt: skip
    optuna.create_study(study_name="killed", storage=st)  # no grid stored, no trial
    study = create_or_check(st, "killed", plan)
    assert load_study(st, "killed")[1].fingerprint() == plan.fingerprint()
    assert len(study.get_trials()) == 2
    other = optuna.create_study(study_name="foreign", storage=st)
    other.enqueue_trial({"x": 1})
    with pytest.raises(LoralabError, match="was not made by loralab"):
        create_or_check(st, "foreign", plan)
    assert len(other.get_trials()) == 1 and storage_mod.STUDY_ATTR not in other.user_attrs


def test_a_study_refused_for_a_foreign_run_folder_leaves_no_storage(tmp_path, capsys):
    """A point's run folder that is no run of that point is refused before the study storage
    is created (it was created, with the study and a claimed trial, then the point refused)."""
    from pathlib import Path

    from conftest import write_mrpc

    write_sst2(tmp_path / "d" / "glue" / "sst2")
    write_mrpc(tmp_path / "d" / "glue" / "mrpc")
    spec = Path(__file__).parents[2] / "configs" / "studies" / "tiny.yaml"
    argv = ["study", str(spec), "--data-root", str(tmp_path / "d"), "--output-dir", str(tmp_path / "res"), "--quiet"]  # fmt: skip
    assert main([*argv, "--dry-run"]) == 0
    first = next(x.strip() for x in capsys.readouterr().out.splitlines() if x.startswith("  "))
    foreign = tmp_path / "res" / "runs" / first
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "exists and is not a loralab run directory" in err and first in err
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["runs"]  # no study.db
    assert (foreign / "notes.txt").read_text() == "mine"


def test_the_folder_precheck_reads_and_never_drops_a_checkpoint(tmp_path):
    """A sibling worker may be writing a checkpoint in a point's folder while another `study`
    process starts: the pre-check must not treat it as damaged and delete it (the claim's
    `decide` does, under the point's lock)."""
    from pathlib import Path

    from conftest import write_mrpc

    from loralab.config import dump_yaml
    from loralab.study.phases import phases
    from loralab.study.reuse import check_run_folders
    from loralab.study.spec import load_spec

    write_sst2(tmp_path / "d" / "glue" / "sst2")
    write_mrpc(tmp_path / "d" / "glue" / "mrpc")
    spec = load_spec(Path(__file__).parents[2] / "configs" / "studies" / "tiny.yaml", str(tmp_path / "d"))  # fmt: skip
    plan = phases(spec, ["sst2"])[0].plan(spec)
    point, res = plan.points()[0], tmp_path / "res"
    run = res / "runs" / point["key"]
    (run / "checkpoints" / "checkpoint-10").mkdir(parents=True)  # being written: no state yet
    (run / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"half")
    (run / "config.yaml").write_text(dump_yaml(plan.config_for(point, str(res))))
    check_run_folders([plan], str(res))
    assert (run / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors").is_file()
