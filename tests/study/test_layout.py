"""Study process layout: workers × threads, siblings that share the study, recorded per run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_sst2

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


def test_study_with_two_workers_shares_points_and_records_the_layout(tmp_path):
    data = tmp_path / "data"
    write_sst2(data / "glue" / "sst2")
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "loralab.cli", "study", str(SPEC), "--data-root", str(data),
           "--output-dir", str(res), "--tasks", "sst2", "--workers", "2", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in res.glob("runs/*/summary.json")]
    assert summaries and all(s["status"] == "completed" for s in summaries)
    # Every point ran once, in a 1-thread process that knew it had a sibling.
    assert len({s["run_dir"] for s in summaries}) == len(summaries)
    assert {(s["layout"]["workers"], s["layout"]["threads"]) for s in summaries} == {(2, 1)}
