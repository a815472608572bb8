"""Idle cores lent to a study's running point: how many threads, when, and what the summary says."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import TrainerCallback

from loralab import summary
from loralab.config import build_config
from loralab.study import spare_cores
from loralab.train import train


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_are_the_cores_the_others_leave_idle_never_fewer_than_the_workers_own():
    assert spare_cores.threads_for(1, 2, 0.0) == 2  # the sibling worker idles
    assert spare_cores.threads_for(1, 2, 0.1) == 2  # a poller is not a user of the core
    assert spare_cores.threads_for(1, 2, 0.6) == 1  # someone works on it
    assert spare_cores.threads_for(1, 2, 1.0) == 1
    assert spare_cores.threads_for(1, 2, 2.5) == 1  # overloaded: still the worker's own share
    assert spare_cores.threads_for(1, 4, 1.0) == 3
    assert spare_cores.threads_for(2, 2, 0.0) == 2


class _Machine:
    """A fake clock and CPU counters: the test says how busy the others and this process were."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0

    def advance(self, seconds: float, others: float, own: float) -> None:
        self.now += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def lender(self, base: int, cores: int, interval: float = 10.0):
        self.said = []
        return spare_cores.SpareCores(base, cores, busy=lambda: self.busy, own=lambda: self.own,
                                      clock=lambda: self.now, interval=interval,
                                      say=self.said.append)  # fmt: skip


def test_a_core_is_lent_while_idle_and_given_back_when_another_process_works():
    torch.set_num_threads(1)
    m = _Machine()
    lender = m.lender(base=1, cores=2)
    m.advance(5, others=0.0, own=1.0)
    lender.check()  # before the interval: no decision
    assert torch.get_num_threads() == 1
    m.advance(5, others=0.02, own=1.0)
    lender.check()
    assert torch.get_num_threads() == 2 and lender.threads == 2
    m.advance(10, others=0.7, own=1.3)  # a sibling worker starts a run beside us
    lender.check()
    assert torch.get_num_threads() == 1
    m.advance(30, others=1.0, own=1.0)
    lender.check()
    assert torch.get_num_threads() == 1
    assert m.said == ["2 threads (idle cores lent; others used 0.0 cores)",
                      "1 threads (cores given back; others used 0.7 cores)"]  # fmt: skip
    # 10 s at one thread, 10 s lent, 30 s at one thread again.
    assert lender.layout_record() == {
        "threads": 1, "threads_max": 2, "lent_share": pytest.approx(0.2)
    }  # fmt: skip
    # What a run's summary records of its layout, with the lender among its callbacks.
    layout = summary.process_layout([object(), lender])
    assert layout["lent_share"] == pytest.approx(0.2) and layout["threads_max"] == 2
    assert "lent_share" not in summary.process_layout([])


def test_no_core_is_lent_to_steps_too_short_to_use_it():
    torch.set_num_threads(1)
    m = _Machine()
    lender = m.lender(base=1, cores=2)
    for _ in range(200):  # 0.1 s steps on an idle machine
        m.advance(0.1, others=0.0, own=1.0)
        lender.check()
    assert torch.get_num_threads() == 1 and lender.layout_record()["threads_max"] == 1
    for _ in range(25):  # 1 s steps
        m.advance(1.0, others=0.0, own=1.0)
        lender.check()
    assert torch.get_num_threads() == 2


def test_machine_busy_time_counts_this_process_too():
    if spare_cores.machine_busy_s() is None:
        pytest.skip("no /proc/stat")
    busy0, own0 = spare_cores.machine_busy_s(), time.process_time()
    end = time.perf_counter() + 30  # on a loaded machine our 0.5 CPU s take longer
    while time.process_time() - own0 < 0.5 and time.perf_counter() < end:
        pass
    busy, own = spare_cores.machine_busy_s(), time.process_time()
    assert own - own0 > 0.3
    assert busy - busy0 >= 0.8 * (own - own0)  # clock ticks round down a little


def test_usable_cores_are_the_affinity_capped_by_a_cpu_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(
        spare_cores.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False
    )
    assert spare_cores.usable_cores(str(tmp_path)) == 8  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert spare_cores.usable_cores(str(tmp_path)) == 8  # v2 without a quota
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert spare_cores.usable_cores(str(tmp_path)) == 2  # 2.5 cores' worth: 2 busy threads
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert spare_cores.usable_cores(str(tmp_path)) == 8  # v1 without a quota
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert spare_cores.usable_cores(str(tmp_path)) == 1


def test_a_lender_only_where_threads_are_fewer_than_cores(monkeypatch):
    monkeypatch.setattr(spare_cores, "usable_cores", lambda: 3)
    torch.set_num_threads(1)
    assert isinstance(spare_cores.lender(), spare_cores.SpareCores)
    torch.set_num_threads(3)
    assert spare_cores.lender() is None  # already every core
    torch.set_num_threads(1)
    monkeypatch.setenv(spare_cores.ENV, "0")
    assert spare_cores.lender() is None


class _Threads(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(torch.get_num_threads())


def test_a_run_trains_on_the_lent_core_and_its_summary_says_so(tmp_path, sst2_dir):
    torch.set_num_threads(1)
    m = _Machine()
    lender = m.lender(base=1, cores=2, interval=1.0)

    class Tick(TrainerCallback):  # one idle second of the fake machine per step
        def on_step_begin(self, args, state, control, **kw):
            m.advance(1, others=0.0, own=1.0)

    seen = _Threads()
    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", f"data.data_dir={sst2_dir}", f"run.output_dir={tmp_path}",
            "run.name=lent", "train.max_steps=4", "train.batch_size=8", "train.precision=fp32",
        ]
    )  # fmt: skip
    result = train(cfg, quiet=True, callbacks=[Tick(), lender, seen])
    assert seen.seen[0] == 2 and set(seen.seen) == {2}  # from the first step's check on
    layout = json.loads((result.run_dir / "summary.json").read_text())["layout"]
    assert layout["threads"] == 1 and layout["threads_max"] == 2
    # The fake clock's seconds: step 1's (ended by the first check) ran on the worker's own
    # thread, steps 2-4 on the lent core; evaluation moves no clock.
    assert layout["lent_share"] == pytest.approx(3 / 4)
