"""How a worker takes its next point: the first waiting trial of its tasks (retries first,
`storage.claim_order`) that fits in memory beside the points running here and that no process
on this host is training now under another study's name (a study's ablation base shares its run
folder with a grid point: it is reused once that finishes), moved from WAITING to RUNNING.

SQLite ignores Optuna's `SELECT ... FOR UPDATE`: two workers that read one WAITING trial at the
same moment both move it to RUNNING, both told they have it (the siblings of `--workers auto`
start together), and both pass the memory check for points that fit only one at a time. So the
workers of one host claim one at a time, under `RESULTS/locks/claim.lock`; across hosts, on
PostgreSQL, the row lock does it.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from ..rundir import LOCKS_DIR, RUNS_DIR
from . import memory
from .leases import lock_here
from .reuse import finished
from .storage import claim_order

CLAIM_LOCK = "claim.lock"


@contextmanager
def one_claimer(locks: Path):
    """Held while a worker of this host picks and claims a point."""
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / CLAIM_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def claim(worker):
    """The trial `worker` (a `worker.Worker`) now holds as RUNNING; None when none is free."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, locks = worker.storage, worker.results_dir / LOCKS_DIR
    with one_claimer(locks):
        waiting = storage.get_all_trials(worker.study_id, deepcopy=False, states=(TrialState.WAITING,))  # fmt: skip
        budget, held = memory.budget_mb(), None  # held: read once, only if a point is a candidate
        for t in sorted(waiting, key=claim_order):
            key = t.user_attrs.get("point")
            if key is None or (worker.tasks and t.user_attrs.get("task") not in worker.tasks):
                continue
            if lock_here(locks / f"{key}.lock") == "held":
                continue  # its run folder is being trained here under another study's name
            held = held or (memory.state(storage, locks) if budget else ({}, []))
            # Reusing a finished run folder (a grid extended under a new name) takes no memory.
            run = worker.results_dir / RUNS_DIR / key
            if budget and not finished(run) and memory.waits(worker, t.user_attrs, *held, budget):
                continue
            # Beat first: a claimed trial must never look stale through an old heartbeat row.
            storage.record_heartbeat(t._trial_id)
            try:
                if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    return t
            except UpdateFinishedTrialError:
                continue
    return None
