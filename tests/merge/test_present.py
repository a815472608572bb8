"""Merge results mirrored to the run's W&B summary; a failing mirror is a note."""

from __future__ import annotations

import pytest
from merge_runs import FAST, make_run, merge_run

from loralab import tracking

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)


def test_results_mirror_to_wandb_when_tracking_is_on(tmp_path, sst2_dir, monkeypatch):
    seen = {}

    class FakeTracker:
        def __init__(self, run_dir, cfg, resuming=False):
            seen.update(run_dir=run_dir, resuming=resuming)

        def summary(self, values):
            seen["summary"] = values

        def finish(self, failed=False):
            seen["finished"] = True

    monkeypatch.setattr(tracking, "Tracker", FakeTracker)
    run = make_run(tmp_path / "runs", sst2_dir, overrides=["tracking.wandb=offline"])
    result = merge_run(run, dtype="fp32", **FAST)
    assert seen["run_dir"] == run and seen["resuming"] and seen["finished"]
    assert seen["summary"]["merge/status"] == "passed"
    assert seen["summary"]["merge/fp32_merge/max_abs_diff"] < 1e-5
    assert seen["summary"]["merge/lora_effect_max_abs"] > 1e-3

    def broken(*args, **kwargs):
        raise RuntimeError("no API key")

    monkeypatch.setattr(tracking, "Tracker", broken)
    result = merge_run(run, dtype="fp32", **FAST)
    assert result.status == "passed" and any("no API key" in n for n in result.notes)
