"""The Optuna storage of sweeps and studies: opening it, creating and checking a study, and the
state of its points.

The plan (`grid.Plan`) is stored in the study (user attribute `loralab`); grid points are Optuna
trials enqueued in WAITING state, which `worker.py` claims and runs.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import inspect
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

from ..errors import LoralabError
from ..redact import mask_secrets
from ..rundir import STUDY_DB
from .grid import Plan, flatten, memory_key
from .leases import BEAT_EVERY, BEATS

STUDY_ATTR = "loralab"
DEFAULT_HEARTBEAT = 20  # seconds between a worker's heartbeats
DEFAULT_MAX_RETRY = 3  # a point whose worker dies more often than this is left failed


def _optuna():
    try:
        import optuna
    except ImportError:
        raise LoralabError(
            "Sweeps and studies need Optuna, a dependency of loralab that is missing here: "
            "pip install 'optuna>=4'."
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(storage: str | None, results_dir: str | Path) -> str:
    """The given URL, or the embedded SQLite file RESULTS/study.db."""
    if storage:
        return storage
    path = Path(results_dir)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(path / STUDY_DB).resolve()}"


def stored_url(results_dir: str | Path | None, storage: str | None = None) -> str | None:
    """The given URL, or RESULTS/study.db's when that file exists; None otherwise (looking
    never creates a storage)."""
    if storage:
        return storage
    db = Path(results_dir) / STUDY_DB if results_dir else None
    return f"sqlite:///{db.resolve()}" if db and db.is_file() else None


def existing(url: str) -> str:
    """`url`, checked to name an existing file when it is SQLite: a command that only reads or
    joins a study must not create an empty database by looking."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise LoralabError(
            f"There is no study storage at '{url[len('sqlite:///') :]}' (--storage "
            f"{masked(url)}): nothing was created. Give the study.db that a sweep or study wrote "
            "(by default RESULTS/study.db), or its results folder."
        )
    return url


def masked(url: str) -> str:
    """The URL without its password (or other credentials), for messages."""
    return mask_secrets(url)


def check_grace(heartbeat: int, grace: int | None) -> None:
    """A grace period must outlast a heartbeat (also checked by `--dry-run`, which opens nothing)."""
    if grace is not None and grace <= heartbeat:
        raise LoralabError(
            f"--grace {grace} is not longer than --heartbeat {heartbeat}: a live point would be "
            "declared dead between two of its own beats, its training killed and retried. Give "
            f"a grace of a few heartbeats (the default is 3x: {3 * heartbeat} s), or leave it out."
        )


# What an attempt records of itself: Optuna's retry copies every user attribute of the failed
# trial, and a retry then started out "interrupted", claimed by the dead worker's host.
ATTEMPT_ATTRS = ("outcome", "worker", BEATS, BEAT_EVERY, "result", "duplicate_of")


def _fresh(retry_cls):
    """`retry_cls` whose retries carry the point's attributes, none of the attempt's."""

    class FreshRetry(retry_cls):
        def __call__(self, study, trial):
            trial = copy.copy(trial)
            trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}  # fmt: skip
            super().__call__(study, trial)

    return FreshRetry


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT, grace: int | None = None,
                 max_retry: int = DEFAULT_MAX_RETRY):  # fmt: skip
    """An RDB storage with heartbeats; a stale trial (its worker died) is re-enqueued."""
    check_grace(heartbeat, grace)
    optuna = _optuna()
    from optuna.storages import RDBStorage

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    retry_cls = _fresh(retry_cls or optuna.storages.RetryFailedTrialCallback)  # optuna < 4.9
    params = inspect.signature(RDBStorage).parameters
    cb_name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"  # fmt: skip
    url = with_driver(url)
    engine = {}
    if url.startswith("postgresql"):
        engine = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    elif url.startswith("sqlite"):
        engine = {"connect_args": {"timeout": 60}}  # several local workers wait on the file lock
    try:
        for attempt in range(3):
            try:
                with warnings.catch_warnings(), _creation_lock(url):
                    warnings.simplefilter("ignore")  # heartbeats are marked experimental
                    return RDBStorage(
                        url, engine_kwargs=engine, heartbeat_interval=int(heartbeat),
                        grace_period=int(grace or 3 * heartbeat), **{cb_name: retry_cls(max_retry=max_retry)},
                    )  # fmt: skip
            except Exception as e:
                # Workers starting together on a new database race to create its tables (on
                # PostgreSQL across machines, where no file lock reaches): the loser retries.
                text = str(e)
                if attempt == 2 or not ("already exists" in text or "duplicate key" in text):
                    raise
                time.sleep(1.0 + attempt)
    except Exception as e:  # driver, network, permissions, bad URL: all the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoralabError(
            f"Cannot open the study storage '{masked(url)}': {first}. Check the URL "
            "(postgresql://user:password@host:5432/db or sqlite:///path/study.db), that the "
            "server is running and reachable from this machine, and the credentials."
        ) from None


@contextlib.contextmanager
def _creation_lock(url: str):
    """SQLite: one process at a time creates the tables (workers started together raced to
    "table studies already exists"); a file lock beside the database, dropped by the kernel.
    Only while the database is missing or empty: opening an existing one (a worker joining, a
    report, `--status`) leaves no file behind; a late racer's "already exists" is retried."""
    if not url.startswith("sqlite:///"):
        yield
        return
    db = Path(url[len("sqlite:///") :])
    lock = db.with_name(db.name + ".lock")
    if not lock.parent.is_dir() or (db.is_file() and db.stat().st_size > 0):
        yield  # a bad path (RDBStorage says so), or a database that has its tables
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def with_driver(url: str) -> str:
    """postgresql:// with the installed driver (SQLAlchemy 2.1 assumes psycopg 3 for it)."""
    if url.startswith(("postgresql://", "postgres://")):
        rest = url.split("://", 1)[1]
        for module, scheme in (
            ("psycopg2", "postgresql+psycopg2"),
            ("psycopg", "postgresql+psycopg"),
        ):
            if importlib.util.find_spec(module):
                return f"{scheme}://{rest}"
        raise LoralabError(
            f"--storage {mask_secrets(url)} needs a PostgreSQL driver and none is installed: pip "
            "install 'loralab[sweep]' (psycopg2-binary), or use the default SQLite storage in "
            "the results folder."
        )
    return url


def describe_difference(old: Plan, new: Plan) -> str:
    """What changed between two plans, in a few words."""
    diffs = []
    for name in ("tasks", "methods", "lrs", "seeds", "variants", "variant_lrs", "per_task"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            diffs.append(f"{name}: {a} in the study, {b} now")
    flat_a, flat_b = flatten(old.base), flatten(new.base)
    keys = sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))
    diffs += [f"{k}: {flat_a.get(k)!r} in the study, {flat_b.get(k)!r} now" for k in keys[:6]]
    return "; ".join(diffs) or "the stored plan differs"


def load_study(storage, name: str):
    """An existing loralab study and its plan."""
    optuna = _optuna()
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in storage.get_all_studies()]
        raise LoralabError(
            f"No study named '{name}' in '{masked(storage.url)}'. Studies there: "
            f"{', '.join(names) or 'none'}. Create it with `loralab sweep` or `loralab ablate`."
        ) from None
    for _ in range(20):  # the creator sets the plan just after creating the study
        data = study.user_attrs.get(STUDY_ATTR)
        if data is not None:
            return study, Plan.from_json(data)
        time.sleep(0.5)
        study = optuna.load_study(study_name=name, storage=storage)
    raise NoStoredGrid(f"Study '{name}' was not made by loralab (it has no stored grid).")


class NoStoredGrid(LoralabError):
    """A study without loralab's stored grid: another tool's, or a creator killed at once."""


def grid_difference(stored: Plan, plan: Plan) -> str | None:
    """None when `plan` continues the `stored` study's grid; else what differs, in words."""
    plan = replace(plan, names_settings=stored.names_settings)  # a sweep's older keys kept
    # Paths are compared resolved against the current folder: a study stored with relative
    # paths (an older sweep, a spec's data_root) or absolute ones (`--data-root /abs`) matches a
    # command that names the same folders the other way.
    if plan.fingerprint() == stored.fingerprint():
        return None
    if plan.with_absolute_paths().fingerprint() == stored.with_absolute_paths().fingerprint():
        return None
    return describe_difference(stored, plan)


def create_or_check(storage, name: str, plan: Plan):
    """Create the study with its grid enqueued; an existing one must hold the same grid."""
    optuna = _optuna()
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        try:
            study, stored = load_study(storage, name)
        except NoStoredGrid:
            # A creator killed between making the study and storing its grid left it empty:
            # it is this plan's to take. One with trials is someone else's.
            study = optuna.load_study(study_name=name, storage=storage)
            if study.get_trials(deepcopy=False):
                raise
            study.set_user_attr(STUDY_ATTR, plan.to_json())
            ensure_enqueued(study, plan)
            return study
        # A sweep stored before keys named LoRA settings beyond r, alpha and target keeps its keys.
        plan = replace(plan, names_settings=stored.names_settings)
        if (differs := grid_difference(stored, plan)) is not None:
            raise LoralabError(
                f"Study '{name}' already exists in '{masked(storage.url)}' with a different grid "
                f"({differs}). It was left untouched. Re-run with the "
                "same options to continue it, or pick a new --study name (a study spec: a new "
                "`name`); finished points in the same results folder are reused, not retrained."
            ) from None
    else:
        study.set_user_attr(STUDY_ATTR, plan.to_json())
    ensure_enqueued(study, plan)
    return study


def ensure_enqueued(study, plan: Plan, tasks: list[str] | None = None) -> int:
    """Enqueue every point (of `tasks`) that has no waiting, running or finished trial. A point
    whose last attempt failed is enqueued as a retry of it (`is_retry`): it may be enqueued
    here just before Optuna's own retry of the same attempt, which is then the duplicate."""
    from optuna.trial import TrialState

    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    trials = study.get_trials(deepcopy=False)
    covered = {t.user_attrs.get("point") for t in trials if t.state in live or is_final(t)}
    failed = {t.user_attrs.get("point"): t.number for t in trials if t.state == TrialState.FAIL}
    n = 0
    for p in plan.points():
        if p["key"] not in covered and (not tasks or p["task"] in tasks):
            attrs = {"point": p["key"], "task": p["task"], "method": p["method"],
                     "memory_key": memory_key(plan.config_for(p))}  # fmt: skip
            if p["key"] in failed:
                attrs["retry_of"] = failed[p["key"]]
            study.enqueue_trial({}, user_attrs=attrs)
            n += 1
    return n


def is_retry(trial) -> bool:
    """A trial enqueued after a failed attempt at its point: by Optuna (`failed_trial`, a dead
    or interrupted worker) or by `ensure_enqueued` (`retry_of`)."""
    return "failed_trial" in trial.system_attrs or "retry_of" in trial.user_attrs


def claim_order(trial) -> tuple[bool, int]:
    """Sort key for waiting trials: retries first (an earlier attempt died, and its run
    directory may hold a checkpoint to resume), then by trial number. Retries are enqueued at
    the end; claimed in plain order they would wait behind every fresh point, so a study
    restarted after a machine went away would leave its half-trained points for last."""
    return (not is_retry(trial), trial.number)


# Outcomes of a failed trial that are final all the same: re-running would repeat them (a
# diverged run; a finished run without a finite main metric). Both score worst in the lr choice.
FINAL_FAILURES = ("diverged", "no-metric")


def is_final(trial) -> bool:
    """A point that is done: completed, or diverged / finished without its main metric."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and trial.user_attrs.get("outcome") in FINAL_FAILURES
    )


def point_states(study, plan: Plan, tasks: list[str] | None = None) -> dict[str, str]:
    """Point key -> done / active / failed / missing, over the points of `tasks`."""
    from optuna.trial import TrialState

    state = {p["key"]: "missing" for p in plan.points() if not tasks or p["task"] in tasks}
    rank = {"missing": 0, "failed": 1, "active": 2, "done": 3}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("point")
        if key not in state:
            continue
        if is_final(t):
            s = "done"
        elif t.state in (TrialState.WAITING, TrialState.RUNNING):
            s = "active"
        elif t.state == TrialState.FAIL:
            s = "failed"
        else:
            continue  # a pruned duplicate says nothing about the point
        if rank[s] > rank[state[key]]:
            state[key] = s
    return state
