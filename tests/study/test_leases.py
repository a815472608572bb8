"""Telling a dead worker's point from a paused one's: the point lock, held by a live process."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3

import optuna
import pytest
from optuna.trial import TrialState

from loralab.study.leases import fail_dead, lock_here
from loralab.study.storage import open_storage


def _lock(path, host):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": 1}))
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_lock_is_held_by_a_live_process_here_free_or_not_ours_to_judge(tmp_path):
    here, there = tmp_path / "a.lock", tmp_path / "b.lock"
    fd = _lock(here, socket.gethostname())
    assert lock_here(here) == "held"
    os.close(fd)  # the holder is gone: the kernel dropped its lock
    assert lock_here(here) == "free"
    fd = _lock(there, "another-host")  # a flock says nothing about another host's workers
    assert lock_here(there) is None
    os.close(fd)
    assert lock_here(tmp_path / "missing.lock") is None


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeat API
def test_a_paused_workers_point_is_vouched_for_a_dead_ones_is_failed(tmp_path):
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=1, grace=3)
    study = optuna.create_study(storage=st, study_name="grid")
    for point in ("paused", "dead"):
        study.enqueue_trial({}, user_attrs={"point": point})
    for t in study.get_trials():
        st.record_heartbeat(t._trial_id)
        assert st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
    with sqlite3.connect(tmp_path / "study.db") as con:  # both silent for a minute
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-60 seconds')")
    locks = tmp_path / "locks"
    fd = _lock(locks / "paused.lock", socket.gethostname())  # its stopped worker still holds it
    os.close(_lock(locks / "dead.lock", socket.gethostname()))  # its holder died
    fail_dead(st, study, locks)
    first = {t.user_attrs["point"]: t.state for t in study.get_trials() if t.number < 2}
    assert first == {"paused": TrialState.RUNNING, "dead": TrialState.FAIL}
    # The dead one's point is enqueued again for the next worker (the storage's retry callback).
    assert [t.user_attrs["point"] for t in study.get_trials(states=(TrialState.WAITING,))] == [
        "dead"
    ]
    os.close(fd)  # now the paused worker dies too: its point is failed at the next check
    with sqlite3.connect(tmp_path / "study.db") as con:  # (its vouched heartbeat ages)
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-60 seconds')")
    fail_dead(st, study, locks)
    assert study.get_trials()[0].state == TrialState.FAIL
