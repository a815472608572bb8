"""A claimed point's heartbeats (`Lease`), its file lock (`PointLock`), and telling a dead
worker's point from a paused one's (`fail_dead`)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

# Trial user attributes of a claim: its worker's heartbeat interval and a count of its beats.
# Workers on other machines may run with another --heartbeat: each judges a point by its
# owner's interval too (`fail_dead`), not by its own grace alone. A count, not a time: the
# checker sees it change on its own clock, so machines' clocks need not agree.
BEAT_EVERY, BEATS = "heartbeat_s", "beats"
# A point is alive while its beat count changed within this many of its owner's intervals.
OWN_GRACE_BEATS = 3
# (storage URL, trial id) -> (beat count, when this process first saw that count: monotonic s).
_SEEN: dict[tuple, tuple[int, float]] = {}


class Lease:
    """Heartbeats for a claimed trial; `lost` is set when someone else declared it dead."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        storage.set_trial_user_attr(trial_id, BEAT_EVERY, float(interval))
        self.beats = 0
        self._record()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _record(self) -> None:
        self.storage.record_heartbeat(self.trial_id)
        self.beats += 1
        self.storage.set_trial_user_attr(self.trial_id, BEATS, self.beats)

    def _beat(self) -> None:
        from optuna.trial import TrialState

        while not self._stop.wait(self.interval):
            try:
                if self.storage.get_trial(self.trial_id).state != TrialState.RUNNING:
                    self.lost.set()
                    return
                self._record()
            except Exception:  # a database hiccup: the grace period covers a few missed beats
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class PointLock:
    """One worker per point and results folder at a time; the kernel drops it if we die."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, lease: Lease) -> bool:
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if lease.lost.is_set():
                    return False
                time.sleep(0.5)

    def note(self, info: dict) -> None:
        """Who holds the lock (for people, and for tests that kill a worker mid-run)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        os.close(self.fd)  # closing drops the flock


def lock_here(lock: Path) -> str | None:
    """'held' when a live process on this host holds the point lock `lock` (a stopped or
    suspended worker still does), 'free' when its note names this host but nobody holds it (the
    kernel dropped a dead worker's lock); None when it is missing or another host's (a flock
    says nothing about another host's workers)."""
    return _lock_state(lock)[0]


def _lock_state(lock: Path) -> tuple[str | None, dict]:
    """(`lock_here`'s answer, the lock's note), from one read of the note."""
    try:
        note = json.loads(lock.read_text() or "{}")
        fd = os.open(lock, os.O_RDONLY)
    except (OSError, ValueError):
        return None, {}
    try:
        if note.get("host") != socket.gethostname():
            return None, note
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "held", note
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "free", note
    finally:
        os.close(fd)


def _died_here(state: str | None, note: dict, number: int) -> bool:
    """Whether the worker that noted trial `number` in a point lock (`_lock_state`'s `state`
    and `note`) ran on this host and is gone: nobody holds the lock and its process no longer
    runs. Its point need not wait out the heartbeat grace. A note from an earlier attempt, a
    live process (a worker between releasing the lock and recording its result) or another
    host's note proves nothing."""
    pid = note.get("pid")
    return state == "free" and note.get("trial") == number and isinstance(pid, int) and not running(pid)  # fmt: skip


def running(pid: int) -> bool:
    """Whether process `pid` still runs (not gone, not a zombie awaiting its reaper)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's live process
        return True


def fail_dead(storage, study, locks: Path) -> None:
    """Fail (and so re-enqueue) the study's points whose worker died: Optuna's
    `fail_stale_trials`, after vouching for the live workers of this host.

    `storage`: the study's (heartbeat) storage. A heartbeat is late for a dead worker, but also
    for one that was stopped (SIGSTOP, a debugger) or whose machine slept: when they wake
    together, another worker's check may come before the paused one's next beat, and would
    throw away all its work since its last checkpoint. A point whose lock
    (`locks`/<point>.lock) a process on this host still holds is alive, so its heartbeat is
    renewed on its behalf first; so is one whose own worker beat within OWN_GRACE_BEATS of its
    interval (a worker elsewhere with a longer --heartbeat than this one's grace allows). A
    point whose worker on this host has died (`_died_here`) is failed at once: a study
    restarted after a crash or a reboot resumes it without waiting out the grace.
    """
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        point = t.user_attrs.get("point")
        state, note = _lock_state(locks / f"{point}.lock") if point else (None, {})
        if _died_here(state, note, t.number):
            dead.append(t._trial_id)
        elif _beating(storage, t) or state == "held":
            storage.record_heartbeat(t._trial_id)
    for tid in dead:
        fail_now(storage, study, tid)
    fail_stale_trials(study)


def fail_now(storage, study, trial_id: int) -> None:
    """Fail a RUNNING trial and re-enqueue its point through the storage's retry callback, as
    Optuna's `fail_stale_trials` does for a late heartbeat."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            if storage.failed_trial_callback is not None:  # the name in every Optuna since 4
                storage.failed_trial_callback(study, storage.get_trial(trial_id))
    except UpdateFinishedTrialError:
        pass  # another worker failed it first


def _beating(storage, trial) -> bool:
    """Whether the trial's own worker beat within OWN_GRACE_BEATS of its interval, as this
    process has watched its count (a count first seen counts as a beat now). Renewing the
    storage's heartbeat leaves the count as it was, so a dead worker's point is failed once its
    own grace has passed."""
    every, beats = trial.user_attrs.get(BEAT_EVERY), trial.user_attrs.get(BEATS)
    if not isinstance(every, (int, float)) or not isinstance(beats, int):
        return False  # claimed by a loralab from before the count: the storage's grace alone
    key, now = (getattr(storage, "url", id(storage)), trial._trial_id), time.monotonic()
    seen = _SEEN.get(key)
    if seen is None or seen[0] != beats:
        _SEEN[key] = (beats, now)
        return True
    return now - seen[1] < OWN_GRACE_BEATS * every
