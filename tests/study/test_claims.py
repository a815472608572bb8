"""A worker's claim: one claimer per host at a time (SQLite has no row lock), and a point
whose run folder this host is training under another study's name is left for later."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from loralab.study import memory
from loralab.study.claims import CLAIM_LOCK, claim
from loralab.study.leases import PointLock
from loralab.study.storage import open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _study(tmp_path, keys):
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=60, grace=120)
    study = optuna.create_study(storage=st, study_name="s")
    for key in keys:
        study.enqueue_trial({}, user_attrs={"point": key, "task": "sst2", "method": "lora"})
    return SimpleNamespace(storage=st, study_id=study._study_id, tasks=None, say=print,
                           points={}, said_waits=set(), results_dir=tmp_path)  # fmt: skip


def test_a_claim_waits_for_the_hosts_claim_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "0")
    worker = _study(tmp_path, ["a", "b"])
    (tmp_path / "locks").mkdir()
    fd = os.open(tmp_path / "locks" / CLAIM_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another worker of this host is claiming
    got = []
    t = threading.Thread(target=lambda: got.append(claim(worker)))
    t.start()
    t.join(1.0)
    assert t.is_alive() and got == []  # it waits: it cannot read WAITING while another claims
    os.close(fd)
    t.join(10)
    assert [g.user_attrs["point"] for g in got] == ["a"]
    assert claim(worker).user_attrs["point"] == "b" and claim(worker) is None


class _Paused:
    """A storage on which a claimer, about to claim, waits until the other is about to claim
    too (or 1 s passed): two workers started together, each having looked at the waiting
    points and the memory they need before either has claimed one."""

    def __init__(self, storage, both_looked: threading.Barrier):
        self._storage, self._both_looked = storage, both_looked

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def record_heartbeat(self, trial_id):  # the claim's first write
        try:
            self._both_looked.wait(timeout=1.0)
        except threading.BrokenBarrierError:
            pass  # the other is not claiming now
        return self._storage.record_heartbeat(trial_id)


def test_two_workers_claiming_at_once_do_not_both_take_a_point_that_fits_once(tmp_path, monkeypatch):  # fmt: skip
    """Two SQuAD v2 points of ~10 GB each, 16 GB to share: without the host's claim lock both
    workers read the waiting points and the free memory before either claims, and SQLite lets
    both move 'a' to RUNNING; with it the second looks after the first has claimed, and waits."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    st = open_storage(url, heartbeat=60, grace=120)
    earlier = optuna.create_study(storage=st, study_name="earlier")  # the measured peak
    earlier.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={
        "point": "p", "result": {"task": "squad_v2", "method": "full", "peak_memory_mb": 9000}}))  # fmt: skip
    study = optuna.create_study(storage=st, study_name="s")
    for key in ("a", "b"):
        study.enqueue_trial({}, user_attrs={"point": key, "task": "squad_v2", "method": "full"})
    monkeypatch.setenv(memory.BUDGET_ENV, "16000")
    both_looked = threading.Barrier(2)
    workers = [SimpleNamespace(storage=_Paused(open_storage(url, heartbeat=60, grace=120), both_looked),
                               study_id=study._study_id, tasks=None, say=lambda _: None,
                               points={}, said_waits=set(), results_dir=tmp_path) for _ in range(2)]  # fmt: skip
    got = []

    def take(w):
        t = claim(w)
        got.append(t and t.user_attrs["point"])

    threads = [threading.Thread(target=take, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got, key=str) == [None, "a"]  # without the lock: ["a", "a"], one point twice


def test_a_point_trained_here_under_another_name_is_left_until_its_lock_frees(tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv(memory.BUDGET_ENV, "0")
    worker = _study(tmp_path, ["base", "other"])
    lock = PointLock(tmp_path / "locks" / "base.lock")  # a grid point with the same run folder
    assert lock.acquire(SimpleNamespace(lost=threading.Event()))
    lock.note({"host": socket.gethostname(), "pid": os.getpid()})
    try:
        assert claim(worker).user_attrs["point"] == "other"
        assert claim(worker) is None  # "base" waits, WAITING still
    finally:
        lock.release()
    trial = claim(worker)
    assert trial.user_attrs["point"] == "base"
    assert worker.storage.get_trial(trial._trial_id).state == TrialState.RUNNING
