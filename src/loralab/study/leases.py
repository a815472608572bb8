"""A claimed point's heartbeats (`Lease`) and its file lock (`PointLock`)."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path


class Lease:
    """Heartbeats for a claimed trial; `lost` is set when someone else declared it dead."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        storage.record_heartbeat(trial_id)
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from optuna.trial import TrialState

        while not self._stop.wait(self.interval):
            try:
                if self.storage.get_trial(self.trial_id).state != TrialState.RUNNING:
                    self.lost.set()
                    return
                self.storage.record_heartbeat(self.trial_id)
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
