"""Study process layout: workers × threads, siblings that share the study, recorded per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_sst2

from loralab import allocator
from loralab.errors import LoralabError
from loralab.study import layout

SPEC = Path(__file__).parents[2] / "configs" / "studies" / "tiny.yaml"


def test_auto_is_one_single_thread_worker_per_core(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert layout.choose("auto", cores=2) == (2, 1)
    assert layout.choose("auto", cores=16) == (16, 1)
    assert layout.choose("1", cores=2) == (1, 2)  # one worker gets every core
    assert layout.choose(4, cores=16) == (4, 4)
    monkeypatch.setenv(layout.ENV_DEFAULT, "1")
    assert layout.choose(None, cores=8) == (1, 8)  # the tests' default


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_bad_worker_counts_are_user_errors(bad):
    with pytest.raises(LoralabError, match="--workers"):
        layout.choose(bad, cores=2)


@pytest.mark.long
def test_study_with_two_workers_shares_points_and_records_the_layout(tmp_path):
    data = tmp_path / "data"
    write_sst2(data / "glue" / "sst2")
    res = tmp_path / "res"
    # tiny.yaml cut to two points (one lr per method, one seed, no ablation): one per worker.
    spec = yaml.safe_load(SPEC.read_text())
    spec.update(lr={"lora": [1.0e-3], "full": [1.0e-4]}, seeds=[1], ablations=[])
    spec["base"]["train"]["max_steps"] = 20
    spec_file = tmp_path / "two-points.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "loralab.cli", "study", str(spec_file), "--data-root", str(data),
           "--output-dir", str(res), "--tasks", "sst2", "--workers", "2", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in res.glob("runs/*/summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    # Every point ran once, in a 1-thread process that knew it had a sibling.
    assert len({s["run_dir"] for s in summaries}) == len(summaries)
    assert {(s["layout"]["workers"], s["layout"]["threads"]) for s in summaries} == {(2, 1)}
    # ... under the heap allocator `loralab` chose (inherited through the worker's forkserver).
    assert {s["layout"]["allocator"] for s in summaries} == {allocator.choose()[0]}
    # Each run could borrow the core its sibling left idle (study.spare_cores).
    if len(os.sched_getaffinity(0)) > 1:
        assert all(0 <= s["layout"]["lent_share"] <= 1 for s in summaries)


def test_built_in_models_are_fetched_once_before_the_workers_start(tmp_path, monkeypatch):
    from loralab.cli import main
    from loralab.models.registry import builtin_dir, is_cached
    from loralab.study import runner

    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))  # tiny-llama not built yet
    write_sst2(tmp_path / "data" / "glue" / "sst2")
    seen = []

    def spawn(argv, workers, threads):  # what the second worker would find
        seen.append(is_cached(builtin_dir("tiny-llama")))
        return []

    monkeypatch.setattr(layout, "spawn_siblings", spawn)
    monkeypatch.setattr(runner, "run_study", lambda *a, **k: runner.StudyOutcome([], []))
    argv = ["study", str(SPEC), "--data-root", str(tmp_path / "data"), "--tasks", "sst2",
            "--output-dir", str(tmp_path / "res"), "--workers", "2"]  # fmt: skip
    assert main(argv) == 0
    assert seen == [True]


def test_workers_are_pinned_round_robin_to_the_visible_gpus():
    assert layout.gpu_for_workers(3, visible="2,5") == ["2", "5", "2"]
    assert layout.gpu_for_workers(2, visible=None, count=4) == ["0", "1"]
    assert layout.gpu_for_workers(2, visible=None, count=0) == [None, None]  # CPU machine


def test_siblings_get_their_own_gpu(monkeypatch):
    started, commands = [], []

    class FakePopen:
        def __init__(self, cmd, env, **kw):
            started.append(env.get("CUDA_VISIBLE_DEVICES"))
            commands.append(cmd[3:])

    monkeypatch.setattr(layout.subprocess, "Popen", FakePopen)
    for name, value in (("CUDA_VISIBLE_DEVICES", "3,4"), ("OMP_NUM_THREADS", "1"),
                        (layout.ENV_WORKERS, "1")):  # fmt: skip
        monkeypatch.setenv(name, value)  # restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    layout.spawn_siblings(["study", "x.yaml", "--workers=auto"], workers=2, threads=torch.get_num_threads())  # fmt: skip
    assert started == ["4"]
    assert commands == [["study", "x.yaml", "--workers", "1"]]  # a sibling starts no more
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # this process, the first worker


@pytest.mark.parametrize("bad", ["0", "-3", "abc"])
def test_bad_worker_counts_are_refused_when_parsed_even_for_a_dry_run(bad, capsys):
    from loralab.cli import main

    with pytest.raises(SystemExit) as e:
        spec = Path(__file__).resolve().parents[2] / "configs" / "studies" / "tiny.yaml"
        main(["study", str(spec), "--workers", bad, "--dry-run"])
    assert e.value.code == 2
    assert (
        f"expected 'auto' (one 1-thread worker per CPU core, one per GPU) or a whole number >= 1, got '{bad}'"
        in capsys.readouterr().err
    )


def test_a_stopping_worker_stops_its_siblings_and_a_finishing_one_leaves_them(tmp_path):
    """SIGTERM (or an error) in the first worker: each sibling gets SIGTERM too, to hand its
    point back, and is waited for; without an exception they are left to finish."""
    code = ("import signal, sys, time, pathlib\n"
            "def stop(*_):\n    pathlib.Path(sys.argv[1]).write_text('stopped'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "pathlib.Path(sys.argv[1] + '.up').touch()\ntime.sleep(60)\n")  # fmt: skip
    marks = [tmp_path / f"s{i}" for i in range(2)]
    siblings = [subprocess.Popen([sys.executable, "-c", code, str(m)]) for m in marks]
    try:
        while not all(Path(f"{m}.up").exists() for m in marks):  # their handlers are set
            time.sleep(0.05)
        with layout.stopping_siblings(siblings):
            pass  # nothing raised: nothing to stop
        assert all(p.poll() is None for p in siblings)
        with pytest.raises(KeyboardInterrupt), layout.stopping_siblings(siblings, grace_s=30):
            raise KeyboardInterrupt
        assert [p.returncode for p in siblings] == [0, 0]
        assert [m.read_text() for m in marks] == ["stopped", "stopped"]
    finally:
        for p in siblings:
            p.kill()
