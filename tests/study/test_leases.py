"""Telling a dead worker's point from a paused one's: the point lock, held by a live process."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeat API
def test_a_point_whose_worker_here_is_gone_is_retried_without_waiting_out_the_grace(tmp_path):
    """A study restarted after a crash sat idle for the grace (minutes by default) before it
    resumed its points. Proof of death on this host: the lock's note names this attempt, the
    lock is free and the noted process is gone. Anything less waits for the heartbeats."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = socket.gethostname()
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=600)  # grace: 30 min
    study = optuna.create_study(storage=st, study_name="grid")
    notes = {  # point -> its lock's note ({trial} is the point's own trial number)
        "dead": {"host": here, "pid": gone.pid},
        "alive": {"host": here, "pid": os.getpid()},  # released its lock, records its result
        "older": {"host": here, "pid": gone.pid, "trial": 99},  # an earlier attempt's note
        "held": {"host": here, "pid": gone.pid},  # a process here holds the lock
        "elsewhere": {"host": "another-host", "pid": gone.pid},
    }
    for point in notes:  # the first carries what an earlier attempt recorded of itself
        attempt = {"outcome": "interrupted", "worker": {"host": "gone"}} if point == "dead" else {}
        study.enqueue_trial({}, user_attrs={"point": point, "task": "sst2", **attempt})
    locks = tmp_path / "locks"
    locks.mkdir()
    for t in study.get_trials():
        st.record_heartbeat(t._trial_id)
        assert st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
        note = {"trial": t.number, **notes[t.user_attrs["point"]]}
        (locks / f"{t.user_attrs['point']}.lock").write_text(json.dumps(note))
    fd = os.open(locks / "held.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        fail_dead(st, study, locks)
    finally:
        os.close(fd)
    states = {t.user_attrs["point"]: t.state for t in study.get_trials() if t.number < 5}
    assert states == {"dead": TrialState.FAIL, **{p: TrialState.RUNNING for p in list(notes)[1:]}}
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["point"] for t in retry] == ["dead"]
    assert retry[0].system_attrs["retry_history"] == [0]
    assert retry[0].user_attrs == {
        "point": "dead",
        "task": "sst2",
    }  # the point's, not the attempt's


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeat API
def test_a_point_is_judged_by_its_own_workers_heartbeat_too(tmp_path, monkeypatch):
    """A worker on another machine beats every 10 s; one here with --heartbeat 1 (grace 3 s)
    failed its point between two beats, and the owner's training was killed. The owner's beat
    count is watched on the checker's own clock (another machine's may be hours off), so a
    dead owner's point is failed once 3 of its intervals pass without a beat."""
    from loralab.study import leases
    from loralab.study.leases import BEATS, Lease

    clock = [1000.0]
    monkeypatch.setattr(leases.time, "monotonic", lambda: clock[0])
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=1, grace=3)
    study = optuna.create_study(storage=st, study_name="grid")
    for point in ("alive", "dies"):
        study.enqueue_trial({}, user_attrs={"point": point})
    alive, dies = study.get_trials()
    owners = {}
    for t in (alive, dies):
        assert st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
        owners[t._trial_id] = Lease(st, t._trial_id, 10.0)  # beats now, then every 10 s
        owners[t._trial_id].stop()

    def silent_for(seconds):  # by the storage's heartbeats, and on the checker's clock
        clock[0] += seconds
        with sqlite3.connect(tmp_path / "study.db") as con:
            con.execute(f"UPDATE trial_heartbeats SET heartbeat = datetime('now', '-{seconds} seconds')")  # fmt: skip

    def states():
        return {t.user_attrs["point"]: t.state for t in study.get_trials() if t.number < 2}

    silent_for(6)  # past the checker's grace, within the owners' 3 x 10 s
    fail_dead(st, study, tmp_path / "locks")
    assert states() == {"alive": TrialState.RUNNING, "dies": TrialState.RUNNING}
    silent_for(20)
    owners[alive._trial_id]._record()  # the live owner beats again; the other one is dead
    silent_for(15)  # 35 s on the checker's clock since the dead one's last beat
    fail_dead(st, study, tmp_path / "locks")
    assert states() == {"alive": TrialState.RUNNING, "dies": TrialState.FAIL}
    assert study.get_trials()[0].user_attrs[BEATS] == 2


def test_a_grace_not_longer_than_the_heartbeat_is_refused(tmp_path):
    from loralab.errors import LoralabError

    with pytest.raises(LoralabError, match="--grace 5 is not longer than --heartbeat 20"):
        open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=20, grace=5)
    assert not (tmp_path / "study.db").exists()


def test_a_dry_run_checks_the_grace_too(tmp_path, capsys):
    """Only a real run opened the storage and checked it: --dry-run said nothing."""
    from loralab.cli import main

    tiny = Path(__file__).parents[2] / "configs" / "studies" / "tiny.yaml"
    argv = ["study", str(tiny), "--output-dir", str(tmp_path / "res"), "--dry-run"]
    assert main([*argv, "--heartbeat", "20", "--grace", "10"]) == 2
    assert "--grace 10 is not longer than --heartbeat 20" in capsys.readouterr().err
    assert main(["sweep", "--tasks", "sst2", "--output-dir", str(tmp_path / "sw"), "--dry-run",
                 "--heartbeat", "20", "--grace", "10"]) == 2  # fmt: skip
    assert "--grace 10 is not longer than --heartbeat 20" in capsys.readouterr().err
    assert not (tmp_path / "res").exists() and not (tmp_path / "sw").exists()
