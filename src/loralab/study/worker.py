"""Workers: claim the next undone grid point of a study, run it as a `train` run, record it.
Exactly once: a point is an Optuna trial, and claiming moves it WAITING -> RUNNING in one
row-locked transaction, so two workers never claim the same trial. A worker beats a heartbeat
while its point runs; when the worker dies, another one marks the trial failed after the grace
period and Optuna's retry callback re-enqueues the point; whoever claims it resumes the run
directory from its last checkpoint (same results folder) or starts it afresh. A completed run
directory is never trained again: a later claim reuses it. Each run trains in a child process forked from a server that has torch already imported (fast
starts), so that peak memory is the run's own and a killed worker takes its run down with it.

Layers: `leases` (heartbeats, the point's lock), `reuse` (reuse/resume/train a run directory),
`child` (the training process); `sweep` creates studies and runs a worker.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .. import tracking
from ..config import to_dict
from ..errors import LoralabError
from ..rundir import LOCKS_DIR, LOGS_DIR, RUNS_DIR, SUMMARY_FILE, SWEEP_FILE
from ..summary import metrics_text
from . import memory
from .bar import PointsBar
from .claims import claim
from .leases import Lease, PointLock, fail_dead, fail_now, running
from .records import main_metric_value, record_from_summary
from .reuse import decide, drop_checkpoints, read_note
from .storage import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_RETRY,
    ensure_enqueued,
    existing,
    is_final,
    load_study,
    open_storage,
    point_states,
    storage_url,
)

# The training child's exit status -> the attempt's outcome (None: the point was lost to
# another worker; any other status, or a signal, is a crash).
CHILD_OUTCOMES = {0: "completed", 3: "diverged", 2: "error", 130: "interrupted", None: "lost"}
CHILD_STOP_S = 30  # how long a stopped worker waits for its training child before SIGKILL


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
                f"worker, {reused} reused); run directories in {self.results_dir / RUNS_DIR}")  # fmt: skip
        if self.unfinished:
            more = " ..." if len(self.unfinished) > 5 else ""
            text += (f"; not finished: {', '.join(self.unfinished[:5])}{more} (logs in "
                     f"{self.results_dir / LOGS_DIR}; re-run to retry)")  # fmt: skip
        return text


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
        self.said_waits: set[str] = set()  # points this worker has said wait for memory
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "tasks": self.tasks}
        methods = mp.get_all_start_methods()
        self.ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            # The server imports torch and loralab.train once (seconds); this worker never
            # needs them, so it starts the server now and goes on with its own set-up meanwhile.
            self.ctx.set_forkserver_preload(["loralab.study.child", "loralab.study.worker"])
            from multiprocessing import forkserver

            forkserver.ensure_running()
        self.report = WorkerReport(study_name, self.results_dir)
        self.bar = None  # `run`'s progress bar (`loralab study` keeps its own over all phases)

    def say(self, text: str) -> None:
        if self.bar is not None:  # above the bar
            self.bar.write(f"[{self.study.study_name}] {text}")
        elif not self.quiet:
            print(f"[{self.study.study_name}] {text}", file=sys.stderr, flush=True)

    def _finished(self, states: dict[str, str] | None = None) -> int:  # done or failed for good
        return sum(s in ("done", "failed") for s in (states or self.states()).values())

    def run(self) -> WorkerReport:
        from optuna.exceptions import ExperimentalWarning

        ensure_enqueued(self.study, self.plan, self.tasks)
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat API
            total = len(self.states())
            self.bar = PointsBar(self.study.study_name, total, self._finished(), self.quiet)
            try:
                looked_again = False
                while True:
                    fail_dead(self.storage, self.study, self.results_dir / LOCKS_DIR)
                    trial = self._claim()
                    if trial is not None:
                        self._handle(trial)
                        self.bar.update(self._finished())
                        continue
                    states = self.states()
                    self.bar.update(self._finished(states))  # points other workers finished
                    # Optuna fails a dead worker's trial, then enqueues its retry: a point seen
                    # failed between the two is looked at once more before leaving.
                    idle = "active" not in states.values()
                    if idle and ("failed" not in states.values() or looked_again):
                        break
                    looked_again = idle
                    time.sleep(self.poll)  # others run the rest: wait for them, or their death
            finally:
                self.bar.close()
                self.bar = None
                if old is not None:
                    signal.signal(signal.SIGTERM, old)
        self.report.states = point_states(self.study, self.plan, self.tasks)
        return self.report

    def step(self) -> bool:
        """Claim and run one waiting point (of this worker's tasks); False when none waits.

        For callers that interleave several studies (`loralab study`); the caller handles
        SIGTERM and Optuna's experimental-API warnings as `run` does."""
        fail_dead(self.storage, self.study, self.results_dir / LOCKS_DIR)
        trial = self._claim()
        if trial is None:
            return False
        self._handle(trial)
        return True

    def states(self) -> dict[str, str]:
        """Point key -> done / active / failed / missing (this worker's tasks)."""
        return point_states(self.study, self.plan, self.tasks)

    def _claim(self):
        return claim(self)

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
        lease = Lease(self.storage, tid, self.heartbeat)
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
            if outcome == "completed":  # trained here: a measured peak for later studies here
                memory.remember(trial.user_attrs, result)
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
                if (result or {}).get("status") == "diverged":
                    outcome = "diverged"
                elif outcome in ("completed", "reused"):  # finished, without a finite value:
                    outcome = "no-metric"  # final all the same (a rerun gives the same)
                self.storage.set_trial_user_attr(tid, "outcome", outcome)
                self.storage.set_trial_state_values(tid, TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass  # declared dead meanwhile; the run directory holds the result for the retry

    def _give_back(self, tid: int) -> None:
        """Interrupted: fail the trial and re-enqueue its point, so the next run resumes it."""
        try:
            self.storage.set_trial_user_attr(tid, "outcome", "interrupted")
            fail_now(self.storage, self.study, tid)
        except Exception:
            pass  # the heartbeat timeout will do the same

    def _run_point(self, trial, point: dict, lease: Lease):
        key = point["key"]
        cfg = self.plan.config_for(point, self.results_dir)
        if cfg.model.trust_remote_code and not self.trust_remote_code:
            self.say(
                f"{key}: warning: the study sets model.trust_remote_code: true; remote code stays "
                "off unless this worker is started with --trust-remote-code."
            )
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, trust_remote_code=self.trust_remote_code))  # fmt: skip
        run_dir = self.results_dir / RUNS_DIR / key
        lock = PointLock(self.results_dir / LOCKS_DIR / f"{key}.lock")
        if not lock.acquire(lease):
            return "lost", None, None
        error = None
        try:
            action, code = decide(run_dir, cfg), None
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
                outcome = CHILD_OUTCOMES.get(code, "crashed")
            result = None
            summary = run_dir / SUMMARY_FILE
            if summary.is_file() and outcome not in ("lost", "crashed", "error", "interrupted"):
                result = record_from_summary(tracking.read_json(summary))
                # A reused run keeps none either: a worker killed between the run's end and
                # this line left them behind (a diverged run keeps its own, to look into).
                if result.get("status") == "completed":
                    drop_checkpoints(run_dir)
                result.update(point=key, group=self.plan.group, study=self.study.study_name)
                result["value"] = main_metric_value(result)
            if run_dir.is_dir():
                self._note(run_dir, key, trial.number, action, outcome, code)
            self.say(f"{key}: {outcome}" + _killed_by(code) + _fmt_metrics(result))
            return outcome, result, error
        finally:
            lock.release()

    def _spawn(self, action, cfg, run_dir: Path, lease: Lease, lock: PointLock, number: int):
        logs = self.results_dir / LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        log, err = logs / f"{run_dir.name}.log", logs / f"{run_dir.name}.error"
        err.unlink(missing_ok=True)
        with open(log, "a") as fh:
            fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {action} (trial {number}) by {self.identity}\n")  # fmt: skip
        proc = self.ctx.Process(target=_child, args=(action, to_dict(cfg), str(run_dir), str(log), str(err)))  # fmt: skip
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
            proc.terminate()  # `loralab.stopping`: it ends its step and saves a checkpoint there
            self.say(
                f"{run_dir.name}: stopping; up to {CHILD_STOP_S} s for a checkpoint at its step"
            )
            end = time.monotonic() + CHILD_STOP_S
            proc.join(CHILD_STOP_S)
            # `kill -- -PGID` ends the fork server too, and join then returns at once (exit
            # 255) with the child still saving: wait for the child itself.
            while running(proc.pid) and time.monotonic() < end:
                time.sleep(0.1)
            if running(proc.pid):
                proc.kill()
                proc.join()
            raise
        message = err.read_text() if err.is_file() else None
        # A user error: every point would repeat it, so the worker stops (`_handle`).
        return proc.exitcode, f"{message} (the point's log: {log})" if proc.exitcode == 2 else None

    def _note(self, run_dir: Path, key: str, number: int, action: str, outcome: str,
              exitcode: int | None = None) -> None:  # fmt: skip
        """Append this attempt to RUN_DIR/sweep.json (we hold the point's lock); `exitcode`: the
        training child's (negative: killed by that signal)."""
        note = read_note(run_dir) or {"point": key, "groups": [], "studies": [], "attempts": []}
        if self.plan.group not in note["groups"]:
            note["groups"].append(self.plan.group)
        if self.study.study_name not in note["studies"]:
            note["studies"].append(self.study.study_name)
        note["attempts"].append({"study": self.study.study_name, "trial": number, "action": action,
                                 "outcome": outcome, "worker": self.identity,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 **({"exitcode": exitcode} if exitcode is not None else {})})  # fmt: skip
        tracking.write_json(run_dir / SWEEP_FILE, note)


def _killed_by(code: int | None) -> str:
    """' (killed by SIGKILL: ...)' for a child a signal ended; '' otherwise."""
    if code is None or code >= 0:
        return ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = ": the kernel's out-of-memory killer sends it (see `dmesg`)" if code == -signal.SIGKILL else ""  # fmt: skip
    return f" (killed by {name}{hint}; a retry resumes from its last checkpoint, if it has one)"


def _fmt_metrics(result: dict | None) -> str:
    if not result or not result.get("metrics"):
        return ""
    shown = metrics_text(result["metrics"])
    return f" ({shown})" if shown else ""


def run_worker(study_name: str, storage: str | None = None, tasks: list[str] | None = None,
               results_dir: str | Path | None = None, heartbeat: int = DEFAULT_HEARTBEAT,
               grace: int | None = None, max_retry: int = DEFAULT_MAX_RETRY,
               quiet: bool = False, trust_remote_code: bool = False) -> WorkerReport:  # fmt: skip
    """`loralab sweep worker`: run undone points of an existing study until none is left."""
    url = existing(storage_url(storage, results_dir or "results"))  # joins, never creates
    st = open_storage(url, heartbeat, grace, max_retry)
    return Worker(st, study_name, tasks, results_dir, heartbeat, quiet, trust_remote_code).run()


def _child(*args) -> None:
    """The training child's entry point; `child` (torch, loralab.train) is imported there only,
    already loaded by the fork server."""
    from .child import child_main

    child_main(*args)
