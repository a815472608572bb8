"""A sweep created with relative paths runs from any folder: its data and results folder are
stored resolved, and a study stored with relative paths still matches the same command."""

from __future__ import annotations

import json

from conftest import write_sst2

from loralab.cli import main
from loralab.study.grid import make_plan
from loralab.study.storage import create_or_check, load_study, open_storage


def test_a_worker_started_in_another_folder_finds_the_data_and_the_results(tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    write_sst2(here / "data" / "sst2", n_train=16, n_dev=8)
    elsewhere.mkdir()
    url = f"sqlite:///{tmp_path / 'paper.db'}"
    monkeypatch.chdir(here)
    create = ["sweep", "--create-only", "--study", "paper", "--storage", url, "--model",
              "tiny-llama", "--data-dir", "data/sst2", "--output-dir", "res", "--methods", "lora",
              "--lora-lr", "1e-3", "--seeds", "1", "train.max_steps=2", "train.batch_size=8"]  # fmt: skip
    assert main(create) == 0
    _, plan = load_study(open_storage(url), "paper")
    assert plan.base["data"]["data_dir"] == str(here / "data" / "sst2")
    assert plan.results_dir == str(here / "res")
    monkeypatch.chdir(elsewhere)
    assert main(["sweep", "worker", "--study", "paper", "--storage", url, "--quiet"]) == 0
    (summary,) = (here / "res" / "runs").glob("*/summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"
    assert list(elsewhere.iterdir()) == []  # nothing written where the worker started


def test_a_study_stored_with_relative_paths_still_matches_its_command(tmp_path, monkeypatch):
    write_sst2(tmp_path / "data", n_train=16, n_dev=8)
    monkeypatch.chdir(tmp_path)
    kw = dict(model={"name": "tiny-llama"}, data={"data_dir": "data"}, methods="lora", seeds="1")
    plan = make_plan(results_dir="res", **kw)
    assert plan.base["data"]["data_dir"] == str(tmp_path / "data")
    # As an older loralab stored it: the paths as typed.
    old = plan.__class__(**{**plan.__dict__, "results_dir": "res",
                            "base": {**plan.base, "data": {**plan.base["data"], "data_dir": "data"}}})  # fmt: skip
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    create_or_check(storage, "old", old)
    create_or_check(storage, "old", plan)  # the same command again: accepted, nothing changes
    _, stored = load_study(storage, "old")
    assert stored.base["data"]["data_dir"] == "data"


def test_a_point_whose_data_is_gone_stops_the_worker_with_exit_2_naming_its_log(
    tmp_path, monkeypatch, capsys
):
    import shutil

    data = write_sst2(tmp_path / "data", n_train=16, n_dev=8)
    url = f"sqlite:///{tmp_path / 's.db'}"
    create = ["sweep", "--create-only", "--study", "s", "--storage", url, "--model", "tiny-llama",
              "--data-dir", str(data), "--output-dir", str(tmp_path / "res"), "--methods", "lora",
              "--lora-lr", "1e-3,2e-3", "--seeds", "1", "train.max_steps=2"]  # fmt: skip
    assert main(create) == 0
    shutil.rmtree(data)  # e.g. a machine without the data folder
    capsys.readouterr()
    assert main(["sweep", "worker", "--study", "s", "--storage", url, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "failed:" in err and "is not a folder" in err and "Traceback" not in err
    log = next((tmp_path / "res" / "logs").glob("*.log"))
    assert f"(the point's log: {log})" in err
    assert len(list((tmp_path / "res" / "logs").glob("*.log"))) == 1  # stopped at the first point


def test_a_study_stored_with_absolute_paths_matches_the_same_folders_given_relative(
    tmp_path, monkeypatch
):
    # A study run with `--data-root /abs/data`, continued (or asked for --status) from the
    # folder where the spec's relative data_root names the same data.
    from dataclasses import replace

    from loralab.study.storage import grid_difference

    for d in ("data", "other"):
        write_sst2(tmp_path / d, n_train=16, n_dev=8)
    monkeypatch.chdir(tmp_path)
    kw = dict(model={"name": "tiny-llama"}, methods="lora", seeds="1", results_dir="res")
    stored = make_plan(data={"data_dir": str(tmp_path / "data")}, **kw)
    relative = make_plan(data={"data_dir": "data"}, **kw)
    data = relative.base["data"]
    as_typed = replace(relative, base={**relative.base, "data": {**data, "data_dir": "data"}})
    assert grid_difference(stored, as_typed) is None
    elsewhere = replace(relative, base={**relative.base, "data": {**data, "data_dir": "other"}})
    assert "data_dir" in (grid_difference(stored, elsewhere) or "")
