"""Running a study spec (`loralab study`): round-robin over its phases' studies, one point at a
time, task by task (a task's grid, its other seeds, its ablations); then the report of every
run under the results folder."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoralabError
from ..rundir import LOCKS_DIR, REPORT_DIR, REPORT_LOCK
from ..summary import ENV_WORKERS
from .bar import PointsBar
from .phases import Phase, StudySpec, best_so_far, grid_values, older_rules, phases
from .prechecks import check_points
from .progress import FINAL
from .report import folder_runs, stored_pending, write_report
from .reuse import check_run_folders
from .spec import check_data, select_tasks, spec_configs
from .status import status_with
from .status_text import totals
from .storage import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_RETRY,
    create_or_check,
    load_study,
    open_storage,
    storage_url,
)
from .worker import Worker


@dataclass
class StudyOutcome:
    lines: list[str]
    unfinished: list[str]  # study names with points not done
    report: object | None = None


class Runner:
    """Over the phases' studies in order (task by task): one point at a time, always from the
    first phase that has one to run."""

    def __init__(self, spec, storage, prefix, tasks, results_dir, heartbeat, quiet, trust=False):
        self.spec, self.storage, self.prefix = spec, storage, prefix
        self.results_dir, self.heartbeat, self.quiet = results_dir, heartbeat, quiet
        self.phases = phases(spec, tasks)
        self.tasks = tasks
        self.workers: dict[str, object] = {}
        self.trust_remote_code = trust  # from the command line only, never from the spec
        self.poll = max(1.0, min(5.0, float(heartbeat)))
        self.bar = None  # `run`'s progress bar over every phase's points, shared by the workers

    def say(self, text: str) -> None:
        if self.bar is not None:  # above the bar
            self.bar.write(f"[{self.prefix}] {text}")
        elif not self.quiet:
            print(f"[{self.prefix}] {text}", file=sys.stderr, flush=True)

    def worker(self, ph: Phase):
        """The phase's worker, creating its study when it can be made; None while it waits."""
        name = ph.study_name(self.prefix)
        if name in self.workers:
            return self.workers[name]
        best, dep, d, values = None, ph.depends_on, None, None
        if dep is not None:
            d = self.worker(dep)
            values = None if d is None else grid_values(d.study, d.plan)
            best = None if d is None else dep.bests(d.plan, values)
            if best is None:
                return None
            source = "the grid" if dep.kind == "grid" else dep.study_name(self.prefix)
            self.say(f"{ph.task}: best lr from {source} {best}; enqueuing {name}")
            if lost := [v for v, lr in best.items() if lr is None]:
                self.say(f"{ph.task}: {', '.join(lost)} diverged at every rate of {source}: not run on its other seeds")  # fmt: skip
        plan = ph.plan(self.spec, best, self.results_dir)
        try:
            create_or_check(self.storage, name, plan)
        except LoralabError as e:
            older = self._made_before_lost_rates(ph, best, d, values, name) or self._made_under_older_rules(ph, best, d, values, name)  # fmt: skip
            if older is None:
                raise self._refusal(ph, name, plan, e) from None
            plan = older
        w = Worker(self.storage, name, [ph.task], self.results_dir, self.heartbeat, self.quiet,
                   self.trust_remote_code)  # fmt: skip
        w.bar = self.bar  # its lines go above the study's bar
        self.workers[name] = w
        return w

    def _made_before_lost_rates(self, ph: Phase, best: dict | None, d, values, name: str):
        """The plan of a study stored before a method that diverged at every rate of its task's
        grid was left out of the seeds (it ran at the grid's smallest rate then), when that is
        the stored one: it goes on as it began. None otherwise."""
        if d is None or ph.depends_on.kind != "grid" or None not in (best or {}).values():
            return None
        older = self._stored_as(ph, best_so_far(d.plan, values), name)
        if older is None:
            return None
        lost = [m for m, lr in best.items() if lr is None]
        self.say(f"{name}: made before a method that diverged at every rate was left out: it keeps running {', '.join(lost)} at the smallest rate")  # fmt: skip
        return older

    def _made_under_older_rules(self, ph: Phase, best: dict | None, d, values, name: str):
        """The plan of a study stored under an earlier rule for choosing rates, when that is the
        stored one: it goes on as it began. None otherwise (`phases.older_rules`)."""
        if d is None:
            return None
        for older_values, change in older_rules(values):
            before = ph.depends_on.bests(d.plan, older_values)
            if before is None or before == best:
                continue
            older = self._stored_as(ph, before, name)
            if older is not None:
                self.say(f"{name}: made before {change}: it keeps the rates it chose then, {before}")  # fmt: skip
                return older
        return None

    def _stored_as(self, ph: Phase, best: dict | None, name: str):
        """The phase's plan at an earlier rule's choice `best`, when that is the plan stored
        under `name`; None otherwise."""
        older = ph.plan(self.spec, best, self.results_dir)
        try:
            create_or_check(self.storage, name, older)
        except LoralabError:
            return None
        return older

    def check_stored(self) -> None:
        """Check every phase whose study is stored already against the spec now, before any
        point trains: a changed spec (a seed added to a task) was refused only when the worker
        reached that phase, after hours of other points."""
        stored = {s.study_name for s in self.storage.get_all_studies()}
        for ph in self.phases:
            if ph.study_name(self.prefix) in stored:
                self.worker(ph)

    def run(self) -> list[str]:
        self.check_stored()
        done, total = self._counts()
        self.bar = PointsBar(self.prefix, total, done, self.quiet)
        for w in self.workers.values():  # made by check_stored: their lines go above it too
            w.bar = self.bar
        try:
            return self._run()
        finally:
            self.bar.close()
            self.bar = None

    def _run(self) -> list[str]:
        while True:
            waiting = False
            ran = False
            for ph in self.phases:
                w = self.worker(ph)
                if w is None:
                    waiting |= self._dependency_runs(ph)
                    continue
                if w.step():
                    ran = True
                    self.progress()
                    break  # back to the first phase: earlier tasks finish first
                waiting |= "active" in w.states().values()
            if ran:
                continue
            if not waiting:
                break
            time.sleep(self.poll)  # others hold the rest, or a grid is still being finished
        return self.summary()

    def _refusal(self, ph: Phase, name: str, plan, e: LoralabError) -> LoralabError:
        """`e`, naming the setting that continues an axis stored when its lr grid ran on every
        seed (before an axis followed lr_selection) where that is what differs."""
        if ph.kind != "ablation" or not ph.ablation.grid_on_first_seed:
            return e
        try:
            stored = load_study(self.storage, name)[1]
        except LoralabError:
            return e
        if not set(plan.seeds) < set(stored.seeds):
            return e
        return LoralabError(
            f"{e} An axis with its own lr grid follows lr_selection, the spec's "
            f"({self.spec.lr_selection}) unless it sets its own; a study stored when such an "
            f"axis ran every rate on every seed continues with `lr_selection: full_grid` on "
            f"axis '{ph.ablation.name}'."
        )

    def _dependency_runs(self, ph: Phase) -> bool:
        """Whether a point that `ph` waits for (its dependency's, or theirs) runs elsewhere."""
        dep = ph.depends_on
        w = self.worker(dep)
        return self._dependency_runs(dep) if w is None else "active" in w.states().values()

    def _status(self):
        return status_with(self.spec, self.results_dir, self.storage, None, self.tasks, self.prefix)

    def _counts(self) -> tuple[int, int]:
        """(points done, points) of the whole study (this worker's tasks)."""
        points = self._status().points
        return sum(p.state in FINAL for p in points), len(points)

    def progress(self) -> None:
        """After each point: the whole study's totals (this worker's tasks), as --status gives."""
        if not self.quiet:
            st = self._status()
            self.bar.update(sum(p.state in FINAL for p in st.points))
            line = totals(st, idle=idle_here(st.points, workers_here(), socket.gethostname()))
            self.say(line.replace("total:", "progress:", 1))

    def summary(self) -> list[str]:
        lines, self.unfinished = [], []
        for ph in self.phases:
            name = ph.study_name(self.prefix)
            w = self.workers.get(name)
            if w is None:
                dep = ph.depends_on
                why = f" (it waits for {ph.waits_on}: '{dep.study_name(self.prefix)}' has unfinished points)" if dep else ""  # fmt: skip
                lines.append(f"study '{name}': not started{why}")
                self.unfinished.append(name)
                continue
            w.report.states = w.states()
            lines.append(w.report.line())
            if w.report.unfinished:
                self.unfinished.append(name)
        return lines


def workers_here() -> int:
    """How many workers `--workers` started on this machine (set in each one's environment)."""
    return int(os.environ.get(ENV_WORKERS, "1") or 1)


def idle_here(points: list, launched: int, host: str) -> int:
    """Workers of this machine between points: the one asking (its point just finished) and
    those of the `launched` not running one, such as siblings still starting (counted as
    none, the first progress line gave the wall time of one worker for the whole study)."""
    busy = {p.worker for p in points if p.state == "running" and (p.worker or "").startswith(f"{host}:")}  # fmt: skip
    return max(1, launched - len(busy))


def run_study(
    spec: StudySpec,
    output_dir: str | None = None,
    storage: str | None = None,
    tasks: list[str] | None = None,
    study: str | None = None,
    heartbeat: int = DEFAULT_HEARTBEAT,
    grace: int | None = None,
    max_retry: int = DEFAULT_MAX_RETRY,
    quiet: bool = False,
    trust_remote_code: bool = False,
) -> StudyOutcome:
    """Create or continue the spec's studies and work on their points (of `tasks`) until none
    is left; then write the report of every run under the results folder."""
    from optuna.exceptions import ExperimentalWarning

    selected = select_tasks(spec, tasks)
    check_data(spec, selected)
    check_points(spec_configs(spec, selected))
    results = str(output_dir or spec.output_dir)
    known = [ph.plan(spec) for ph in phases(spec, selected) if ph.depends_on is None]
    check_run_folders(known, results)
    st = open_storage(storage_url(storage, results), heartbeat, grace, max_retry)
    runner = Runner(
        spec, st, study or spec.name, tasks, results, heartbeat, quiet, trust_remote_code
    )
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat API
            lines = runner.run()
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    rep = write_study_report(results, storage)
    return StudyOutcome(lines, runner.unfinished, rep)


def write_study_report(results: str | Path, storage: str | None = None):
    """The report of every finished run under `results` (RESULTS/report), one writer at a time."""
    root = Path(results)
    lock = root / LOCKS_DIR / REPORT_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # workers finishing together take turns
        records = folder_runs(root, storage)  # runs without sweep.json: grouped as stored
        if not records:
            return None
        source = f"run directories under {root}"
        return write_report(records, root / REPORT_DIR, source, stored_pending(root))
    finally:
        os.close(fd)
