"""Workers: claim the next undone grid point of a study, run it as a `train` run, record it.

Exactly once: a point is an Optuna trial, and claiming moves it WAITING -> RUNNING in one
row-locked transaction, so two workers never claim the same trial. A worker beats a heartbeat
while its point runs; when the worker dies, another one marks the trial failed after the grace
period and Optuna's retry callback re-enqueues the point; whoever claims it resumes the run
directory from its last checkpoint (same results folder) or starts it afresh. A completed run
directory is never trained again: a later claim reuses it.

Each run trains in a child process forked from a server that has torch already imported (fast
starts), so that peak memory is the run's own and a killed worker takes its run down with it.
"""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import tracking
from .errors import LoralabError
from .sweep import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_RETRY,
    ensure_enqueued,
    is_final,
    load_study,
    open_storage,
    point_states,
    storage_url,
)

SWEEP_FILE = "sweep.json"  # in each run directory: which studies and workers used it


@dataclass
class WorkerReport:
    study: str
    results_dir: Path
    handled: dict = field(default_factory=dict)  # point key -> outcome, for this worker
    states: dict = field(default_factory=dict)  # point key -> done/active/failed/missing

    @property
    def unfinished(self) -> list[str]:
        return [k for k, s in self.states.items() if s != "done"]

    def line(self) -> str:
        done = len(self.states) - len(self.unfinished)
        ran = sum(o in ("completed", "diverged") for o in self.handled.values())
        reused = sum(o == "reused" for o in self.handled.values())
        text = (f"study '{self.study}': {done}/{len(self.states)} points done ({ran} run by this "
                f"worker, {reused} reused); run directories in {self.results_dir / 'runs'}")  # fmt: skip
        if self.unfinished:
            text += f"; not finished: {', '.join(self.unfinished[:5])}" + (
                " ..." if len(self.unfinished) > 5 else ""
            )
            text += f" (logs in {self.results_dir / 'logs'}; re-run to retry)"
        return text


class _Lease:
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


class _PointLock:
    """One worker per point and results folder at a time; the kernel drops it if we die."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, lease: _Lease) -> bool:
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


def _resolve_defaults(flat: dict, cfg) -> None:
    """Fill values left to defaults, as a run folder's config.yaml records them."""
    from .tasks import get_task

    if flat.get("train.lr") is None:
        flat["train.lr"] = cfg.lr
    if flat.get("data.max_length") is None:
        flat["data.max_length"] = get_task(cfg.data.task).default_max_length


def _same_config(run_dir: Path, cfg) -> str | None:
    """None when the run directory holds this config; else the first differing key."""
    from .config import from_dict, load_yaml, to_dict
    from .sweep import _flatten

    def norm(d: dict) -> dict:
        d = json.loads(json.dumps(d))
        d.pop("run", None)
        d["model"].pop("trust_remote_code", None)  # taken from the command line, not the folder
        for k in ("data_dir", "train_file", "eval_file"):
            if d["data"].get(k):
                d["data"][k] = str(Path(d["data"][k]).expanduser().resolve())
        return _flatten(d)

    have = norm(to_dict(from_dict(load_yaml(run_dir / tracking.CONFIG_FILE))))
    want = norm(to_dict(cfg))
    paths = [f"data.{k}" for k in ("data_dir", "train_file", "eval_file")]
    if any(have.get(k) != want.get(k) for k in paths) and _same_data(run_dir, cfg):
        for k in paths:  # the folder moved (e.g. a fresh clone elsewhere): same rows, same run
            have[k] = want.get(k)
    _resolve_defaults(have, cfg)
    _resolve_defaults(want, cfg)
    if want.get("train.precision") == "auto":  # decided per machine when the run started
        want["train.precision"] = have.get("train.precision")
    for k in sorted(have.keys() | want.keys()):
        if have.get(k) != want.get(k):
            return f"{k}: {have.get(k)!r} there, {want.get(k)!r} in this study"
    return None


def _same_data(run_dir: Path, cfg) -> bool:
    """Whether the run's recorded data fingerprint equals that of the data `cfg` points at.

    Data paths are stored absolute, so a results folder used from another location (a clone
    elsewhere) names other paths for the same files; the rows' content decides.
    """
    from .data import content_fingerprint
    from .tasks import get_task

    try:
        recorded = tracking.read_json(run_dir / tracking.SUMMARY_FILE).get("data_fingerprint") or {}
    except (LoralabError, OSError):
        return False
    if not recorded.get("train_sha256"):
        return False
    try:
        task = get_task(cfg.data.task)
        train = task.load("train", cfg.data.data_dir, cfg.data.train_file)
        evals = task.load("eval", cfg.data.data_dir, cfg.data.eval_file)
    except (LoralabError, OSError):
        return False
    return recorded.get("train_sha256") == content_fingerprint(train) and recorded.get(
        "eval_sha256"
    ) == content_fingerprint(evals)


def _decide(run_dir: Path, cfg) -> str:
    """reuse (finished), resume (has a checkpoint) or train (fresh)."""
    if not run_dir.exists():
        return "train"
    if not (run_dir / tracking.CONFIG_FILE).is_file():
        if any(run_dir.iterdir()):
            raise LoralabError(
                f"'{run_dir}' exists and is not a loralab run directory; the sweep will not "
                "touch it. Move it away or use another --output-dir."
            )
        return "train"
    diff = _same_config(run_dir, cfg)
    if diff:
        raise LoralabError(
            f"Run directory '{run_dir}' holds a run with other settings ({diff}). Its results "
            "are kept: use another --output-dir for this study."
        )
    summary = run_dir / tracking.SUMMARY_FILE
    status = tracking.read_json(summary).get("status") if summary.is_file() else None
    if status in ("completed", "diverged"):
        return "reuse"
    attempts = _read_note(run_dir).get("attempts", [])
    if (
        attempts
        and attempts[-1].get("action") == "resume"
        and attempts[-1].get("outcome") == "crashed"
    ):
        return "train"  # the checkpoint itself is broken (e.g. killed while being written)
    return "resume" if _usable_checkpoints(run_dir) else "train"


def _usable_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that pass resume's check (trainer_state.json, weights and archives intact);
    a kill while one was being written leaves a partial folder, removed here so the point is
    resumed from an earlier one or, with none left, trained afresh."""
    from .checkpoints import checkpoint_problem, checkpoints

    good = []
    for ckpt in checkpoints(run_dir):
        if checkpoint_problem(ckpt) is None:
            good.append(ckpt)
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
    return good


def _read_note(run_dir: Path) -> dict:
    path = run_dir / SWEEP_FILE
    return tracking.read_json(path) if path.is_file() else {}


def _child_main(action: str, config: dict, run_dir: str, log: str, err: str) -> None:
    """In the child: train (or resume) one point, output to its log; exit 0/2/3/1."""
    _die_with_parent()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    from .config import from_dict
    from .errors import TrainingDiverged
    from .train import resume, train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    code = 0
    try:
        if action == "resume":
            trust = bool(config["model"].get("trust_remote_code"))
            resume(run_dir, quiet=True, trust_remote_code=trust)
        else:
            train(from_dict(config), quiet=True)
    except TrainingDiverged as e:
        print(f"loralab: diverged: {e}")
        code = 3
    except LoralabError as e:
        print(f"loralab: error: {e}")
        Path(err).write_text(str(e))
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _die_with_parent() -> None:
    """A child must not outlive its worker (else a retried point would train twice)."""
    parent = mp.parent_process()  # its sentinel is a pipe the worker holds: EOF when it dies
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class Worker:
    """Runs the undone points of one study (optionally only some tasks) until none is left."""

    def __init__(self, storage, study_name: str, tasks: list[str] | None = None,
                 results_dir: str | Path | None = None, heartbeat: int = DEFAULT_HEARTBEAT,
                 quiet: bool = False, trust_remote_code: bool = False):  # fmt: skip
        self.storage = storage
        # Remote code runs only when this worker's command line asks for it, never because the
        # (possibly shared) study's config says so.
        self.trust_remote_code = trust_remote_code
        self.study, self.plan = load_study(storage, study_name)
        self.study_id = self.study._study_id
        unknown = sorted(set(tasks or []) - set(self.plan.tasks))
        if unknown:
            raise LoralabError(
                f"--tasks {','.join(unknown)}: not in study '{study_name}' (its tasks: "
                f"{', '.join(self.plan.tasks)})."
            )
        self.tasks = list(tasks) if tasks else None
        self.results_dir = Path(results_dir or self.plan.results_dir)
        self.heartbeat = heartbeat
        self.poll = max(1.0, min(5.0, float(heartbeat)))
        self.quiet = quiet
        self.points = {p["key"]: p for p in self.plan.points()}
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "tasks": self.tasks}
        methods = mp.get_all_start_methods()
        self.ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            self.ctx.set_forkserver_preload(["loralab.train"])
        self.report = WorkerReport(study_name, self.results_dir)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.study.study_name}] {text}", file=sys.stderr, flush=True)

    def run(self) -> WorkerReport:
        from optuna.exceptions import ExperimentalWarning
        from optuna.storages import fail_stale_trials

        ensure_enqueued(self.study, self.plan, self.tasks)
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat API
            try:
                while True:
                    fail_stale_trials(self.study)
                    trial = self._claim()
                    if trial is not None:
                        self._handle(trial)
                        continue
                    if "active" not in point_states(self.study, self.plan, self.tasks).values():
                        break
                    time.sleep(self.poll)  # others run the rest: wait for them, or their death
            finally:
                if old is not None:
                    signal.signal(signal.SIGTERM, old)
        self.report.states = point_states(self.study, self.plan, self.tasks)
        return self.report

    def step(self) -> bool:
        """Claim and run one waiting point (of this worker's tasks); False when none waits.

        For callers that interleave several studies (`loralab study`); the caller handles
        SIGTERM and Optuna's experimental-API warnings as `run` does."""
        from optuna.storages import fail_stale_trials

        fail_stale_trials(self.study)
        trial = self._claim()
        if trial is None:
            return False
        self._handle(trial)
        return True

    def states(self) -> dict[str, str]:
        """Point key -> done / active / failed / missing (this worker's tasks)."""
        return point_states(self.study, self.plan, self.tasks)

    def _claim(self):
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,)):  # fmt: skip
            if "point" not in t.user_attrs or (
                self.tasks and t.user_attrs.get("task") not in self.tasks
            ):
                continue
            # Beat first: a claimed trial must never look stale through an old heartbeat row.
            self.storage.record_heartbeat(t._trial_id)
            try:
                if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    return t
            except UpdateFinishedTrialError:
                continue
        return None

    def _duplicate_of(self, trial) -> int | None:
        """Another trial that owns this point (finished, or active with a lower number)."""
        from optuna.trial import TrialState

        for t in self.storage.get_all_trials(self.study_id, deepcopy=False):
            if t.number == trial.number or t.user_attrs.get("point") != trial.user_attrs["point"]:
                continue
            if is_final(t) or (
                t.state in (TrialState.WAITING, TrialState.RUNNING) and t.number < trial.number
            ):
                return t.number
        return None

    def _handle(self, trial) -> None:
        from optuna.trial import TrialState

        tid, key = trial._trial_id, trial.user_attrs["point"]
        lease = _Lease(self.storage, tid, self.heartbeat)
        try:
            self.storage.set_trial_user_attr(tid, "worker", self.identity)
            dup = self._duplicate_of(trial)
            if dup is not None or key not in self.points:
                self.storage.set_trial_user_attr(tid, "outcome", "duplicate")
                self.storage.set_trial_user_attr(tid, "duplicate_of", dup)
                self.storage.set_trial_state_values(tid, TrialState.PRUNED)
                return
            try:
                outcome, result, error = self._run_point(trial, self.points[key], lease)
            except LoralabError:
                self._finish(tid, "error", None)  # e.g. a foreign run directory: not retried
                raise
            self.report.handled[key] = outcome
            self._finish(tid, outcome, result)
            if error:
                raise LoralabError(f"Point {key} failed: {error}")
        except KeyboardInterrupt:
            self._give_back(tid)
            raise
        finally:
            lease.stop()

    def _finish(self, tid: int, outcome: str, result: dict | None) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        if outcome == "lost":
            return  # someone else declared us dead and re-enqueued the point
        value = (result or {}).get("value")
        try:
            self.storage.set_trial_user_attr(tid, "outcome", outcome)
            if result:
                self.storage.set_trial_user_attr(tid, "result", result)
            if outcome in ("completed", "reused") and value is not None and math.isfinite(value):
                self.storage.set_trial_state_values(tid, TrialState.COMPLETE, [value])
            else:
                self.storage.set_trial_user_attr(
                    tid,
                    "outcome",
                    "diverged" if (result or {}).get("status") == "diverged" else outcome,
                )
                self.storage.set_trial_state_values(tid, TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass  # declared dead meanwhile; the run directory holds the result for the retry

    def _give_back(self, tid: int) -> None:
        """Interrupted: fail the trial and re-enqueue its point, so the next run resumes it."""
        from optuna.trial import TrialState

        try:
            self.storage.set_trial_user_attr(tid, "outcome", "interrupted")
            if self.storage.set_trial_state_values(tid, TrialState.FAIL):
                self.storage.failed_trial_callback(self.study, self.storage.get_trial(tid))
        except Exception:
            pass  # the heartbeat timeout will do the same

    def _run_point(self, trial, point: dict, lease: _Lease):
        from .report import main_metric_value, record_from_summary

        key = point["key"]
        cfg = self.plan.config_for(point, self.results_dir)
        if cfg.model.trust_remote_code and not self.trust_remote_code:
            self.say(
                f"{key}: warning: the study sets model.trust_remote_code: true; remote code stays "
                "off unless this worker is started with --trust-remote-code."
            )
        cfg.model.trust_remote_code = self.trust_remote_code
        run_dir = self.results_dir / "runs" / key
        lock = _PointLock(self.results_dir / "locks" / f"{key}.lock")
        if not lock.acquire(lease):
            return "lost", None, None
        error = None
        try:
            action = _decide(run_dir, cfg)
            lock.note({**self.identity, "point": key, "trial": trial.number, "action": action})
            if action == "reuse":
                outcome = "reused"
            else:
                if action == "train" and run_dir.exists():
                    shutil.rmtree(run_dir)  # unfinished, no checkpoint: nothing to keep
                self.say(
                    f"{key}: {'resuming' if action == 'resume' else 'training'} (trial {trial.number})"
                )
                code, error = self._spawn(action, cfg, run_dir, lease, lock, trial.number)
                outcome = {0: "completed", 3: "diverged", 2: "error", None: "lost"}.get(
                    code, "crashed"
                )
            result = None
            summary = run_dir / tracking.SUMMARY_FILE
            if summary.is_file() and outcome not in ("lost", "crashed", "error"):
                result = record_from_summary(tracking.read_json(summary))
                result.update(point=key, group=self.plan.group, study=self.study.study_name)
                result["value"] = main_metric_value(result)
            if run_dir.is_dir():
                self._note(run_dir, key, trial.number, action, outcome)
            self.say(f"{key}: {outcome}" + _fmt_metrics(result))
            return outcome, result, error
        finally:
            lock.release()

    def _spawn(self, action, cfg, run_dir: Path, lease: _Lease, lock: _PointLock, number: int):
        from .config import to_dict

        logs = self.results_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log, err = logs / f"{run_dir.name}.log", logs / f"{run_dir.name}.error"
        err.unlink(missing_ok=True)
        with open(log, "a") as fh:
            fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {action} (trial {number}) by {self.identity}\n")  # fmt: skip
        proc = self.ctx.Process(target=_child_main, args=(action, to_dict(cfg), str(run_dir), str(log), str(err)))  # fmt: skip
        proc.start()
        lock.note({**self.identity, "point": run_dir.name, "trial": number, "action": action, "child_pid": proc.pid})  # fmt: skip
        try:
            while proc.exitcode is None:
                proc.join(0.5)
                if lease.lost.is_set():  # another worker owns the point now: stop training it
                    proc.kill()
                    proc.join()
                    return None, None
        except BaseException:
            proc.terminate()
            proc.join(30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            raise
        message = err.read_text() if err.is_file() else None
        if proc.exitcode == 1:
            message = f"crashed; see {log}"
        return proc.exitcode, message if proc.exitcode == 2 else None

    def _note(self, run_dir: Path, key: str, number: int, action: str, outcome: str) -> None:
        """Append this attempt to RUN_DIR/sweep.json (we hold the point's lock)."""
        note = _read_note(run_dir) or {"point": key, "groups": [], "studies": [], "attempts": []}
        if self.plan.group not in note["groups"]:
            note["groups"].append(self.plan.group)
        if self.study.study_name not in note["studies"]:
            note["studies"].append(self.study.study_name)
        note["attempts"].append({"study": self.study.study_name, "trial": number, "action": action,
                                 "outcome": outcome, "worker": self.identity,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})  # fmt: skip
        tracking.write_json(run_dir / SWEEP_FILE, note)


def _fmt_metrics(result: dict | None) -> str:
    if not result or not result.get("metrics"):
        return ""
    shown = ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float))
    return f" ({shown})" if shown else ""


def run_worker(study_name: str, storage: str | None = None, tasks: list[str] | None = None,
               results_dir: str | Path | None = None, heartbeat: int = DEFAULT_HEARTBEAT,
               grace: int | None = None, max_retry: int = DEFAULT_MAX_RETRY,
               quiet: bool = False, trust_remote_code: bool = False) -> WorkerReport:  # fmt: skip
    """`loralab sweep worker`: run undone points of an existing study until none is left."""
    url = storage_url(storage, results_dir or "results")
    st = open_storage(url, heartbeat, grace, max_retry)
    return Worker(st, study_name, tasks, results_dir, heartbeat, quiet, trust_remote_code).run()
