"""Sweeps on Optuna: the grid, bad inputs, a killed sweep resumed, workers sharing a PostgreSQL study."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import (
    lock_held,
    process_gone,
    run_status,
    start_cli,
    write_mrpc,
    write_rte,
    write_sst2,
)

from loralab.cli import main
from loralab.errors import LoralabError
from loralab.study.grid import ablation_variants, make_plan

TINY = ["train.batch_size=8", "train.logging_steps=5", "train.eval_batch_size=32", "train.save_steps=5"]  # fmt: skip
FAST = ["--heartbeat", "1", "--grace", "3", "--quiet"]  # a dead worker's point is retried after 3 s


def _plan(tmp_path, **kw):
    return make_plan(model={"name": "tiny-llama"}, results_dir=str(tmp_path / "res"), **kw)


def test_default_grid_follows_the_spec(tmp_path):
    plan = _plan(tmp_path, tasks="sst2,mrpc", seeds="1,2")
    points = plan.points()
    assert len(points) == 2 * 2 * (2 + 2)  # tasks × seeds × (LoRA lrs + full lrs)
    assert sorted({p["lr"] for p in points if p["method"] == "lora"}) == [1e-4, 3e-4]
    assert sorted({p["lr"] for p in points if p["method"] == "full"}) == [1e-5, 3e-5]
    assert make_plan(model={"name": "tiny-llama"}).seeds == [42, 1337, 2024]
    assert points[0]["key"] == "sst2-lora-tiny-llama-lr0.0001-s1-r8-a16-standard"
    assert points[2]["key"] == "sst2-full-tiny-llama-lr1e-05-s1"
    cfgs = [plan.config_for(p) for p in points]
    assert {c.train.batch_size for c in cfgs} == {16}  # the same batch size for both methods
    assert {c.train.warmup_ratio for c in cfgs} == {0.06}
    c = cfgs[0]
    assert (c.run.output_dir, c.run.name) == (str(tmp_path / "res" / "runs"), points[0]["key"])
    assert (c.train.method, c.train.lr, c.train.seed, c.data.task) == ("lora", 1e-4, 1, "sst2")
    assert len({p["key"] for p in points}) == len(points)


def test_ablation_grids():
    base = {"r": 8, "alpha": 16.0, "target": "standard"}
    assert [(v["r"], v["alpha"]) for v in ablation_variants("rank", base)] == [(4, 8), (8, 16), (16, 32)]  # fmt: skip
    assert [(v["r"], v["alpha"]) for v in ablation_variants("alpha", base)] == [(8, 8), (8, 16), (8, 32)]  # fmt: skip
    assert [v["target"] for v in ablation_variants("modules", base)] == ["standard", "extended", "all-linear"]  # fmt: skip
    product = ablation_variants("all", base)
    assert len(product) == 27 and len({tuple(v.values()) for v in product}) == 27
    with pytest.raises(LoralabError, match="Unknown ablation type 'depth'"):
        ablation_variants("depth", base)


def test_ablation_plan_and_per_task_overrides(tmp_path):
    plan = _plan(tmp_path, kind="ablation", ablation="rank", tasks="sst2,mrpc", seeds="1",
                 lora_lr="1e-3", overrides=["train.max_steps=5", "mrpc:data.max_train_examples=7"])  # fmt: skip
    assert plan.methods == ["lora"] and plan.group == "ablation-rank"
    cfgs = {(p["task"], p["lora"].get("r")): plan.config_for(p) for p in plan.points()}
    assert len(cfgs) == 6
    assert cfgs[("mrpc", 16)].data.max_train_examples == 7
    assert cfgs[("sst2", 16)].data.max_train_examples is None
    assert cfgs[("sst2", 4)].lora.alpha == 8 and cfgs[("sst2", 4)].train.max_steps == 5
    assert plan.fingerprint() != _plan(tmp_path, kind="ablation", ablation="rank", tasks="sst2,mrpc",
                                       seeds="1,2", lora_lr="1e-3").fingerprint()  # fmt: skip
    with pytest.raises(LoralabError, match="use --lora-lr/--full-lr instead"):
        _plan(tmp_path, overrides=["train.lr=1e-3"])
    with pytest.raises(LoralabError, match="rte, which is not in the grid"):
        _plan(tmp_path, tasks="sst2", overrides=["rte:train.max_steps=5"])


def _sweep_args(tmp_path, data, *extra):
    return ["sweep", "--model", "tiny-llama", "--data-dir", str(data), "--output-dir",
            str(tmp_path / "res"), "--lora-lr", "1e-3", "--full-lr", "1e-4", *extra]  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_config_files_lr_is_not_silently_dropped(tmp_path, sst2_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 5.0e-4\n")
    for command in (["sweep"], ["ablate", "--type", "rank"]):
        argv = [*command, "--model", "tiny-llama", "--data-dir", str(sst2_dir), "--config",
                str(cfg), "--output-dir", str(tmp_path / "res")]  # fmt: skip
        assert main(argv) == 2
        assert "sets train.lr=0.0005, which a" in capsys.readouterr().err
        assert not (tmp_path / "res").exists()
    # Given the grid's own rates, the file's value is plainly overridden.
    argv = [*argv, "--lora-lr", "5e-4", "--create-only"]
    assert main(argv) == 0


def test_bad_inputs_exit_2_and_leave_the_study_untouched(tmp_path, sst2_dir, capsys):
    assert main(_sweep_args(tmp_path, sst2_dir, "--seeds", "")) == 2
    assert "The grid is empty: no seeds" in capsys.readouterr().err
    assert main(_sweep_args(tmp_path, sst2_dir, "--methods", "lora,full", "--lora-lr", ",")) == 2
    assert "no lora learning rates" in capsys.readouterr().err
    # A flag's bad value names the flag (a negative rate named train.lr; 1.5 'is not a int').
    assert main(_sweep_args(tmp_path, sst2_dir, "--lora-lr=-1e-4")) == 2
    assert "--lora-lr: '-1e-4' is not a positive learning rate" in capsys.readouterr().err
    assert main(_sweep_args(tmp_path, sst2_dir, "--seeds", "1.5")) == 2
    assert "--seeds: '1.5' is not an integer" in capsys.readouterr().err
    # Names a run would refuse are refused before the study exists, not point by point later.
    for bad, needle in [("lora.target=standrad", "Unknown LoRA target preset 'standrad'"),
                        ("--head=prompt", "model.head='prompt' is not a known head"),
                        ("data.prompt=Say: {text_a}", "the classifier head would ignore it"),
                        ("--model=tiny-lama", "did you mean tiny-llama?"),
                        ("data.train_file=/nothere.tsv", "'/nothere.tsv', which does not exist")]:  # fmt: skip
        assert main(_sweep_args(tmp_path, sst2_dir, bad)) == 2
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "res").exists()
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--type", "depth"])
    assert e.value.code == 2 and "invalid choice: 'depth'" in capsys.readouterr().err
    bad_url = "postgresql://nobody@127.0.0.1:9/nothing"  # nothing listens on port 9
    assert main(_sweep_args(tmp_path, sst2_dir, "--storage", bad_url)) == 2
    err = capsys.readouterr().err
    assert (
        "Cannot open the study storage" in err and "127.0.0.1:9" in err and "Traceback" not in err
    )

    assert main(_sweep_args(tmp_path, sst2_dir, "--seeds", "1,2", "--create-only")) == 0
    db = tmp_path / "res" / "study.db"
    before = _sha(db)
    assert main(_sweep_args(tmp_path, sst2_dir, "--seeds", "1,2,3", "--create-only")) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "different grid" in err and "seeds: [1, 2]" in err
    assert main(_sweep_args(tmp_path, sst2_dir, "--seeds", "1,2", "--create-only", "train.max_steps=3")) == 2  # fmt: skip
    assert "train.max_steps: -1 in the study, 3 now" in capsys.readouterr().err
    assert _sha(db) == before  # not a byte of the existing study changed

    assert main(["sweep", "worker", "--output-dir", str(tmp_path / "res")]) == 2
    assert "give --study NAME" in capsys.readouterr().err
    # Commands that read or join a study never create a storage by naming one.
    ghost = tmp_path / "ghost.db"
    for argv in (["report", "--study", "x", "--storage", f"sqlite:///{ghost}"],
                 ["sweep", "status", "--study", "x", "--storage", f"sqlite:///{ghost}"],
                 ["sweep", "worker", "--study", "x", "--storage", f"sqlite:///{ghost}"]):  # fmt: skip
        assert main(argv) == 2
        assert f"There is no study storage at '{ghost}'" in capsys.readouterr().err
        assert not ghost.exists() and not list(tmp_path.glob("ghost.db*"))
    assert main(["sweep", "worker", "--study", "nope", "--output-dir", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "No study named 'nope'" in err and "Studies there: sweep-sst2" in err
    assert main(["sweep", "worker", "--study", "sweep-sst2", "--output-dir", str(tmp_path / "res"), "--tasks", "rte"]) == 2  # fmt: skip
    assert "not in study 'sweep-sst2'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Real processes, real kills


def _steps_saved(run: Path) -> int:
    """The last complete checkpoint's step (the Trainer writes trainer_state.json last)."""
    done = (run / "checkpoints").glob("checkpoint-*/trainer_state.json")
    return max((int(c.parent.name.split("-")[1]) for c in done), default=0)


def _kill_mid_run(res: Path, workers: dict[int, subprocess.Popen], need_done: int = 0, timeout=300):
    """SIGKILL the worker training a point that saved a checkpoint and is far from done."""
    end = time.time() + timeout
    while time.time() < end:
        runs = list((res / "runs").glob("*")) if (res / "runs").is_dir() else []
        done = [r for r in runs if run_status(r) == "completed"]
        for run in runs:
            lock = res / "locks" / f"{run.name}.lock"
            if (len(done) < need_done or run_status(run) == "completed" or not lock.is_file()
                    or not 0 < _steps_saved(run) <= 40):  # of 60 steps  # fmt: skip
                continue
            try:
                info = json.loads(lock.read_text())
            except ValueError:
                continue
            if info.get("pid") in workers and "child_pid" in info and lock_held(lock):
                os.kill(info["pid"], signal.SIGKILL)
                workers[info["pid"]].wait()
                return run, info
        assert all(p.poll() is None for p in workers.values()), "a worker finished before the kill"
        time.sleep(0.05)
    raise AssertionError("no point was caught mid-run")


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): _sha(p) for p in run.rglob("*") if p.is_file()}


def _trials(storage_url: str, study: str):
    from loralab.study.storage import load_study, open_storage

    study, _ = load_study(open_storage(storage_url), study)
    return study.get_trials(deepcopy=False)


def _check_exactly_once(res: Path, trials, keys: set[str]) -> None:
    from optuna.trial import TrialState

    assert {r.name for r in (res / "runs").iterdir()} == keys  # no run-2 folders: nothing redone
    for key in keys:
        run = res / "runs" / key
        assert run_status(run) == "completed", key
        complete = [t for t in trials if t.user_attrs.get("point") == key and t.state == TrialState.COMPLETE]  # fmt: skip
        assert len(complete) == 1, (key, complete)
        attempts = json.loads((run / "sweep.json").read_text())["attempts"]
        trained = [a for a in attempts if a["action"] in ("train", "resume") and a["outcome"] == "completed"]  # fmt: skip
        assert len(trained) == 1, (key, attempts)
        assert [a["action"] for a in attempts if a["action"] == "train"] in (["train"], []), (
            attempts
        )


@pytest.mark.long
def test_killed_sweep_resumes_every_point_exactly_once(tmp_path, sst2_dir):
    res = tmp_path / "res"
    args = _sweep_args(tmp_path, sst2_dir, "--seeds", "1,2", "--study", "s", *FAST,
                       "train.max_steps=60", *TINY)  # fmt: skip
    first = start_cli(args, tmp_path / "first.log")
    killed_run, info = _kill_mid_run(res, {first.pid: first}, need_done=1)
    assert first.returncode == -signal.SIGKILL
    deadline = time.time() + 20
    while not process_gone(info["child_pid"]) and time.time() < deadline:
        time.sleep(0.1)
    assert process_gone(info["child_pid"]), "the training child outlived its killed worker"
    finished = {
        r.name: _snapshot(r) for r in (res / "runs").iterdir() if run_status(r) == "completed"
    }
    assert finished and killed_run.name not in finished

    second = start_cli(args, tmp_path / "second.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]

    keys = {p["key"] for p in make_plan(
        model={"name": "tiny-llama"}, data={"data_dir": str(sst2_dir)}, seeds="1,2", lora_lr="1e-3",
        full_lr="1e-4", overrides=["train.max_steps=60", *TINY]).points()}  # fmt: skip
    trials = _trials(f"sqlite:///{res / 'study.db'}", "s")
    _check_exactly_once(res, trials, keys)
    for name, files in finished.items():  # results finished before the kill are intact
        after = _snapshot(res / "runs" / name)
        assert {k: after[k] for k in files} == files, name
    summary = json.loads((killed_run / "summary.json").read_text())
    assert summary["resumed_from"] and "checkpoint-" in summary["resumed_from"]
    assert summary["steps"] == 60
    by_worker = {t.user_attrs["worker"]["pid"] for t in trials
                 if t.user_attrs.get("point") == killed_run.name}  # fmt: skip
    assert by_worker == {first.pid, second.pid}  # the dead worker's trial was retried

    # The report on that study, from the run directories and from the storage, by hand.
    assert main(["report", str(res)]) == 0
    assert main(["report", str(res), "--study", "s", "--out", str(tmp_path / "rep")]) == 0
    for out in (res / "report", tmp_path / "rep"):
        assert {"report.md", "report.html", "report.csv", "runs.csv"} <= {p.name for p in out.iterdir()}  # fmt: skip
        with open(out / "report.csv") as fh:
            rows = {r["method"]: r for r in csv.DictReader(fh)}
        accs = {}
        for run in (res / "runs").iterdir():
            s = json.loads((run / "summary.json").read_text())
            accs.setdefault(s["method"], []).append(s["metrics"]["accuracy"])
        for method in ("lora", "full"):
            assert float(rows[method]["accuracy_mean"]) == pytest.approx(statistics.mean(accs[method]))  # fmt: skip
            assert float(rows[method]["accuracy_std"]) == pytest.approx(statistics.stdev(accs[method]))  # fmt: skip
        delta = 100 * (statistics.mean(accs["lora"]) - statistics.mean(accs["full"]))
        assert float(rows["lora"]["lora_minus_full_points"]) == pytest.approx(delta)
        assert rows["lora"]["drop_target_pass"] == str(delta >= -3)


def test_sweep_then_ablation_reuses_runs_then_report(tmp_path, sst2_dir, capsys):
    res = tmp_path / "res"
    common = ["--model", "tiny-llama", "--data-dir", str(sst2_dir), "--output-dir", str(res),
              "--seeds", "1", "--lora-lr", "1e-3", "--quiet"]  # fmt: skip
    assert main(["sweep", *common, "--full-lr", "1e-4", "train.max_steps=6", *TINY]) == 0
    assert "study 'sweep-sst2': 2/2 points done" in capsys.readouterr().out
    assert main(["ablate", "--type", "rank", *common, "train.max_steps=6", *TINY]) == 0
    out = capsys.readouterr().out
    assert "study 'ablate-rank-sst2': 3/3 points done (2 run by this worker, 1 reused)" in out
    assert main(["report", str(res)]) == 0
    runs = sorted(r.name for r in (res / "runs").iterdir())
    assert len(runs) == 4  # LoRA r=8 and full; the rank ablation reuses r=8, adds r=4 and r=16
    shared = json.loads((res / "runs" / "sst2-lora-tiny-llama-lr0.001-s1-r8-a16-standard" / "sweep.json").read_text())  # fmt: skip
    assert shared["groups"] == ["sweep", "ablation-rank"]
    assert [a["action"] for a in shared["attempts"]] == ["train", "reuse"]
    md = (res / "report" / "report.md").read_text()
    assert "## Ablation: rank" in md and "## LoRA vs full fine-tuning" in md
    assert (res / "report" / "figures" / "ablation_rank.png").is_file()

    # Another study whose points land on these run directories with other settings: refused.
    before = _snapshot(res / "runs")
    other = ["sweep", "--study", "other", *common, "--full-lr", "1e-4", "train.max_steps=7", *TINY]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (train.max_steps: 6 there, 7 in this study)" in err
    assert _snapshot(res / "runs") == before
    # Refused before the storage changed (the study and a claimed trial were left in it).
    from loralab.study.storage import open_storage

    names = {s.study_name for s in open_storage(f"sqlite:///{res / 'study.db'}").get_all_studies()}
    assert "other" not in names and "sweep-sst2" in names


def test_three_workers_share_a_postgres_study(pg_url, tmp_path):
    glue = tmp_path / "glue"
    write_sst2(glue / "sst2")
    write_mrpc(glue / "mrpc", n=32)
    write_rte(glue / "rte", n=32)
    res, study = tmp_path / "res", f"pg-{uuid.uuid4().hex[:8]}"
    common = ["--study", study, "--storage", pg_url, "--output-dir", str(res), *FAST]
    create = ["sweep", "--create-only", "--model", "tiny-llama", "--data-dir", str(glue),
              "--tasks", "sst2,mrpc,rte", "--methods", "lora", "--lora-lr", "1e-3", "--seeds", "1,2",
              *common, "train.max_steps=60", *TINY]  # fmt: skip
    assert main(create) == 0
    filters = {"w1": "mrpc,rte", "w2": "sst2,mrpc", "w3": "sst2,rte"}  # every task on two workers
    procs = {}
    for name, tasks in filters.items():
        p = start_cli(["sweep", "worker", *common, "--tasks", tasks], tmp_path / f"{name}.log")
        procs[p.pid] = p
    killed_run, info = _kill_mid_run(res, procs)
    killed = info["pid"]
    for pid, p in procs.items():
        if pid != killed:
            assert p.wait(timeout=600) == 0, [
                f.read_text()[-2000:] for f in tmp_path.glob("w*.log")
            ]

    from optuna.trial import TrialState

    trials = _trials(pg_url, study)
    keys = {t.user_attrs["point"] for t in trials}
    assert len(keys) == 6
    _check_exactly_once(res, trials, keys)
    for t in trials:  # every attempt, finished or killed, was on a worker allowed that task
        if "worker" in t.user_attrs:
            assert t.user_attrs["task"] in t.user_attrs["worker"]["tasks"], t.user_attrs
    retried = [t for t in trials if t.user_attrs.get("point") == killed_run.name]
    dead = [t for t in retried if t.user_attrs["worker"]["pid"] == killed]
    assert len(dead) == 1 and dead[0].state == TrialState.FAIL
    (done,) = [t for t in retried if t.state == TrialState.COMPLETE]
    assert done.user_attrs["worker"]["pid"] != killed
    assert json.loads((killed_run / "summary.json").read_text())["resumed_from"]

    out = tmp_path / "rep"
    assert main(["report", "--study", study, "--storage", pg_url, "--out", str(out)]) == 0
    with open(out / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_a_finished_run_is_reused_from_another_data_location_only_with_the_same_rows(tmp_path):
    """A results folder used from a clone elsewhere names other data paths for the same files."""
    import dataclasses
    import shutil

    from conftest import write_sst2

    from loralab.config import build_config
    from loralab.errors import LoralabError
    from loralab.study.reuse import decide
    from loralab.train import train

    here = write_sst2(tmp_path / "a" / "sst2")
    cfg = build_config(
        overrides=["model.name=tiny-llama", f"data.data_dir={here}", "train.max_steps=2",
                   "train.batch_size=8", f"run.output_dir={tmp_path / 'res'}", "run.name=p"]
    )  # fmt: skip
    run = train(cfg, quiet=True).run_dir
    moved = tmp_path / "b" / "sst2"
    shutil.copytree(here, moved)
    same = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=str(moved)))
    assert decide(run, same) == "reuse"
    other = write_sst2(tmp_path / "c" / "sst2", seed=5)  # other rows
    changed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=str(other)))
    with pytest.raises(LoralabError, match="data.data_dir"):
        decide(run, changed)


def test_a_folder_holding_only_a_half_written_config_trains(tmp_path):
    """A run killed between making its folder and renaming config.yaml into place left only
    the temporary file: the point was refused for good as 'not a loralab run directory'."""
    from loralab.errors import LoralabError
    from loralab.study.reuse import decide

    run = tmp_path / "p"
    run.mkdir()
    (run / ".config.yaml.k2j3h4").write_text("model: {na")
    assert decide(run, None) == "train"
    (run / "notes.txt").write_text("mine")
    with pytest.raises(LoralabError, match="is not a loralab run directory"):
        decide(run, None)
