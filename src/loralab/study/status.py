"""Where a study stands (`loralab study SPEC --status`): every point's state, how far a running
or interrupted point got, and an estimate of the training compute left. Reads the storage and
the run directories; creates and changes nothing.

A point's state, from its Optuna trials (the most advanced one counts):
  done / diverged / no metric   final (COMPLETE, or FAIL with outcome `diverged` or `no-metric`)
  running           RUNNING: a worker holds it (`stale` when its lock on this host is free: the
                    worker died and the next worker's heartbeat check re-enqueues it)
  interrupted       WAITING after a failed attempt: the next worker claims it first and resumes
                    its last checkpoint
  waiting           WAITING, never started
  failed            FAIL with no live trial: its retries are used up, or it stopped on an error
  not enqueued      no trial yet (the study is not created, or a dependent phase not made yet)

The estimate: an unfinished point costs what a point of its task and method costs (see
`estimate.py`), less the share its checkpoint or log already holds.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import tracking
from ..errors import LoralabError
from ..rundir import RUNS_DIR, STUDY_DB
from . import memory
from .estimate import makespan, overheads, point_costs, training_chars, wall_per_cpu
from .phases import Phase, StudySpec, best_lrs, grid_values, older_rules, phases
from .progress import FINAL, finished_value, read_run
from .records import main_metric, tie_inputs
from .spec import select_tasks, with_lr_placeholder
from .storage import (
    NoStoredGrid,
    existing,
    grid_difference,
    is_final,
    is_retry,
    load_study,
    open_storage,
    stored_url,
)  # fmt: skip


@dataclass
class PointStatus:
    """One point of one phase."""

    phase: str  # the phase's study name
    key: str  # run directory name; `-lr<best>` while the grid has not chosen the lr
    task: str
    method: str
    state: str  # see the module docstring
    metric: str  # the task's main metric
    value: float | None = None  # its dev value (done)
    cpu_s: float | None = None  # training CPU seconds (done, from summary.json)
    loss: float | None = None  # the final dev loss (done, from summary.json, where recorded)
    wall_s: float | None = None  # training wall seconds (done, from summary.json)
    setup_s: float | None = None  # wall s before the first step (done in one attempt)
    eval_s: float | None = None  # wall s of the final evaluation (done)
    started_at: float | None = None  # Unix time its training started (done; None: unrecorded)
    machine: str | None = None  # the machine it ran on (done; `tracking.machine_name`)
    progress: float | None = None  # share of training logged so far (0..1)
    resumes_at: float | None = None  # share held by the last checkpoint (0..1)
    resumes_cpu_s: float | None = None  # training CPU seconds up to that checkpoint
    resumes_wall_s: float | None = None  # ... and training wall seconds
    logged_ago_s: float | None = None  # seconds since the run last logged
    last_eval: dict | None = None  # an unfinished run's newest dev evaluation: step, value, loss
    lent_threads: int | None = None  # running on idle cores lent to it: its threads now
    detail: str = ""  # outcome of a failed attempt, stale worker, ...
    worker: str | None = None  # host:pid of the worker running it
    memory_key: str | None = None  # its configuration for this machine's peaks (`memory.py`)
    reusable: bool = False  # not final, but its run folder holds a finished run (reused)

    @property
    def finished(self) -> bool:
        """Final, or reused as soon as it is claimed: costs no more training."""
        return self.state in FINAL or self.reusable


@dataclass
class PhaseStatus:
    name: str
    task: str
    kind: str  # grid / seeds / ablation / ablation-seeds
    created: bool
    waits_for_grid: bool = False
    # The grid's best lr per method (grid phases: once complete); an axis grid's per value.
    best: dict | None = None
    so_far: dict | None = None  # waiting: the best lr so far among the grid's finished lrs
    points: list[PointStatus] = field(default_factory=list)
    config: object = None  # one point's ExperimentConfig (its task's data, caps, schedule)
    waits_on: str = "the grid's best lr"  # what waits_for_grid waits for, in words
    refused: str = ""  # stored with another grid than the spec's (what differs): `study` exits 2


@dataclass
class StudyStatus:
    results_dir: str
    storage: str | None  # None: no storage yet (nothing has run)
    phases: list[PhaseStatus]
    # The machine the estimate is for (`tracking.machine_name`): this one, which a worker
    # asking runs its points on; None: any.
    here: str | None = None
    # The tasks not selected (`--tasks`): their points only tell how fast the machines ran.
    others: list[PointStatus] = field(default_factory=list)

    _cost_cache: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def points(self) -> list[PointStatus]:
        return [p for ph in self.phases for p in ph.points]

    def costs(self) -> dict[tuple[str, str], float]:
        """Training CPU s of one point per (task, method) (`estimate.point_costs`)."""
        return self._cost_tiers()[0]

    def rough(self) -> set[tuple[str, str]]:
        """The (task, method) pairs costed only from other tasks' cost per training character."""
        return self._cost_tiers()[1]

    def _cost_tiers(self) -> tuple[dict, set]:
        if self._cost_cache is None:
            # The other tasks' finished points: a machine's speed shows on any task.
            pts = self.points + [p for p in self.others if p.finished]
            costs = point_costs(pts, here=self.here)
            lacking = {p.task for p in self.points if not p.finished and (p.task, p.method) not in costs}  # fmt: skip
            chars = {}
            if lacking:  # reading the training files costs seconds: only when they are needed
                configs = {ph.task: ph.config for ph in self.phases if ph.config is not None}
                chars = {t: c for t, cfg in configs.items() if (c := training_chars(cfg))}
            full = point_costs(pts, chars, self.here)
            anywhere = point_costs(pts, chars) if self.here else full
            self._cost_cache = (full, set(full) - set(costs), anywhere)
        return self._cost_cache

    def left_of(self, p: PointStatus, costs: dict | None = None) -> float | None:
        """Training CPU s point `p` still needs (0 when finished); None when nothing to go by.
        A point running on another host costs what any machine's points did, not this one's."""
        if p.finished:
            return 0.0
        if p.state == "running" and p.worker and p.worker.rsplit(":", 1)[0] != socket.gethostname():
            costs = self._cost_tiers()[2]
        cost = (costs if costs is not None else self.costs()).get((p.task, p.method))
        if cost is None:
            return None
        held = p.progress if p.state == "running" else p.resumes_at
        return cost * (1.0 - min(1.0, held or 0.0))

    def estimate(self) -> tuple[float, float, int]:
        """(CPU s spent on finished points and on unfinished ones up to their last checkpoints,
        CPU s left for the estimable unfinished ones, how many unfinished points have no cost
        for their task and method yet)."""
        spent = sum(p.cpu_s for p in self.points if p.finished and p.cpu_s is not None)
        spent += sum(p.resumes_cpu_s or 0.0 for p in self.points if not p.finished)
        costs = self.costs()
        lefts = [self.left_of(p, costs) for p in self.points if not p.finished]
        return spent, sum(x for x in lefts if x is not None), lefts.count(None)

    def wall_left(self, idle: int = 0) -> tuple[float, int] | None:
        """(wall s until the estimable unfinished points are done, workers): the workers running
        points now and `idle` ones between points (the one asking), each taking the next point
        when it frees (interrupted ones first; failed ones are left), at the wall s per
        training CPU s of the newest finished points, plus their start-up (a point started
        anew) and final evaluation (`estimate.overheads`). None: no worker."""
        costs, busy, queued = self.costs(), {}, []
        known = self.points + [p for p in self.others if p.finished]
        ratio, extra = wall_per_cpu(known, self.here), overheads(known, self.here)
        pending = (p for p in self.points if not p.finished and p.state != "failed")
        for p in sorted(pending, key=lambda p: p.state != "interrupted"):
            left, (setup, final) = self.left_of(p, costs), extra.get((p.task, p.method), (0, 0))
            if p.state == "running" and p.worker and not p.detail.startswith("stale"):
                busy[p.worker] = busy.get(p.worker, 0.0) + (left or 0.0) * (ratio or 0) + final
            elif left is not None:
                queued.append(left * (ratio or 0) + setup + final)
        if not busy and not idle or ratio is None:
            return None
        return makespan([*busy.values(), *[0.0] * idle], queued), len(busy) + idle


def _storage(results: str, storage: str | None):
    """(URL, storage) of the given URL or the default SQLite file; (None, None) when that file
    does not exist (looking never creates it)."""
    url = existing(storage) if storage else stored_url(results)
    return url, (open_storage(url) if url else None)


def _plan_points(status: PhaseStatus, plan, trials: list, results: str) -> None:
    """Fill `status.points` with the plan's points (keys with `lr<best>` while it waits; then
    a plan at the grid's best lr so far tells which finished run folders it would reuse)."""
    for p in plan.points():
        if status.config is None:
            status.config = plan.config_for(p, results)
        key = p["key"]
        if status.waits_for_grid:
            key = with_lr_placeholder(key)
        ps = PointStatus(status.name, key, p["task"], p["method"], "not enqueued", main_metric(p["task"]))  # fmt: skip
        if not status.waits_for_grid:
            _fill(ps, [t for t in trials if t.user_attrs.get("point") == p["key"]])
            read_run(ps, Path(results), p["key"], plan.config_for(p, results))
        elif status.so_far:  # only a finished folder counts: an lr not chosen yet has no progress
            seen = PointStatus(ps.phase, ps.key, ps.task, ps.method, ps.state, ps.metric)
            read_run(seen, Path(results), p["key"], plan.config_for(p, results))
            if seen.reusable:
                ps.reusable, ps.cpu_s, ps.started_at = True, seen.cpu_s, seen.started_at
                chooser = "this setting's" if status.kind == "ablation-seeds" else "the grid's"
                ps.detail = f"reused if {chooser} best lr stays {p['lr']:g} (its run folder is finished)"  # fmt: skip
        status.points.append(ps)


def study_status(spec: StudySpec, results_dir: str | None = None, storage: str | None = None,
                 tasks: list[str] | None = None, prefix: str | None = None) -> StudyStatus:  # fmt: skip
    """The state of every point of the spec's phases (of `tasks`) in `results_dir`."""
    results = str(results_dir or spec.output_dir)
    url, st = _storage(results, storage)
    return status_with(spec, results, st, url, tasks, prefix)


def status_with(spec: StudySpec, results: str, st, url: str | None = None,
                tasks: list[str] | None = None, prefix: str | None = None) -> StudyStatus:  # fmt: skip
    """`study_status` on an open storage `st` (None: nothing stored yet); for a running study."""
    prefix = prefix or spec.name
    names = {s.study_name for s in st.get_all_studies()} if st else set()
    studies: dict[str, tuple] = {}

    def trials_of(name: str):
        if name not in studies:
            import optuna

            study = optuna.load_study(study_name=name, storage=st)
            studies[name] = (study, study.get_trials(deepcopy=False))
        return studies[name]

    def chosen(chooser: Phase) -> tuple[dict | None, dict | None, list[dict]]:
        """(What a grid phase chose (`Phase.bests`), else None; the best so far among its
        finished lrs; what earlier rules chose, `phases.older_rules`) from its stored results,
        else its finished run folders (a grid extended under a new name reuses them): the lr a
        worker will pick, so the points it will reuse show."""
        grid_name = chooser.study_name(prefix)
        if grid_name not in bests:
            grid_plan = chooser.plan(spec, None, results)
            values = grid_values(trials_of(grid_name)[0] if grid_name in names else None, grid_plan)
            for key, v in values.items():
                if v is None:  # a finished folder a worker would reuse: its value and loss
                    values[key] = finished_value(Path(results), key)
                    loss, base = tie_inputs({}, Path(results) / RUNS_DIR / key)
                    if loss is not None:
                        values.losses[key] = loss
                    if base is not None:
                        values.baselines[key] = base
            older = [b for v, _ in older_rules(values) if (b := chooser.bests(grid_plan, v))]
            bests[grid_name] = (chooser.bests(grid_plan, values), chooser.bests(grid_plan, values, complete=False), older)  # fmt: skip
        return bests[grid_name]

    bests: dict[str, tuple] = {}  # per grid: the phases that wait on it share one
    out, others, selected = [], [], select_tasks(spec, tasks)
    for ph in phases(spec):
        name = ph.study_name(prefix)
        chooses = ph.chooses
        dep = ph.depends_on
        best, so_far, older = chosen(dep) if dep else chosen(ph) if chooses else (None, None, [])
        waits = dep is not None and best is None
        plan = ph.plan(spec, best or (so_far if waits else None), results)
        methods = plan.methods if dep is not None and dep.kind == "grid" else None
        refused = ""
        if name in names and not waits and None not in (_methods(best, methods) or {}).values():
            refused = _refusal(st, name, plan)
            for before in older if refused and dep is not None else []:
                alt = ph.plan(spec, before, results)
                if before != best and not _refusal(st, name, alt):  # stored under that rule:
                    plan, best, refused = alt, before, ""  # a worker goes on with it
                    break
        best, so_far = _methods(best, methods), _methods(so_far, methods)
        status = PhaseStatus(name, ph.task, ph.kind, name in names, waits,
                             best if chooses or not waits else None,
                             so_far if waits else None, waits_on=ph.waits_on)  # fmt: skip
        status.refused = refused
        _plan_points(status, plan, trials_of(name)[1] if name in names else [], results)
        (out if ph.task in selected else others).append(status)
    if st is not None:
        _memory_waits([p for ph in out for p in ph.points], st)
    return StudyStatus(results, url, out, tracking.this_machine(), [p for ph in others for p in ph.points])  # fmt: skip


def _refusal(st, name: str, plan) -> str:
    """What differs between the stored study `name` and the spec's `plan` ('' when nothing):
    what `loralab study` would refuse (exit 2) on reaching it."""
    try:
        return grid_difference(load_study(st, name)[1], plan) or ""
    except NoStoredGrid:
        return ""


def _methods(best: dict | None, methods: list[str] | None) -> dict | None:
    """`best` with only `methods` (None: all): an ablation shows LoRA's rate alone."""
    if best is None or methods is None:
        return best
    return {m: lr for m, lr in best.items() if m in methods}


def _memory_waits(points: list[PointStatus], st) -> None:
    """Say why a waiting point would not start on this host now: its predicted peak does not
    fit beside the running points' (what a worker here checks, `memory.py`). Phrased as what a
    free worker would do: where every worker is busy, the point waits its turn anyway, and
    `--status` cannot see idle workers."""
    budget = memory.budget_mb()
    waiting = [p for p in points if p.state in ("waiting", "interrupted") and not p.reusable]
    if budget is None or not waiting:
        return
    peaks, reserved = memory.state(st)  # no locks: fails nothing
    for p in waiting:
        lead = "a free worker here would hold it back for memory"
        attrs = {"task": p.task, "method": p.method, "memory_key": p.memory_key}
        p.detail = memory.why_waits(attrs, peaks, reserved, budget, lead) or p.detail


def sweep_status(study_name: str, storage: str | None = None, results_dir: str | None = None,
                 tasks: list[str] | None = None) -> StudyStatus:  # fmt: skip
    """The state of every point of one existing sweep or ablation study (`loralab sweep
    status`); its run directories under `results_dir`, else the folder stored with the study."""
    url, st = _storage(results_dir or "results", storage)
    if st is None:
        raise LoralabError(
            f"No study storage: {Path(results_dir or 'results') / STUDY_DB} does not exist. Give "
            "--storage URL, or --output-dir with the folder that holds study.db."
        )
    study, plan = load_study(st, study_name)
    if unknown := sorted(set(tasks or []) - set(plan.tasks)):  # as `sweep worker` refuses them
        raise LoralabError(
            f"--tasks {','.join(unknown)}: not in study '{study_name}' (its tasks: "
            f"{', '.join(plan.tasks)})."
        )
    results = str(results_dir or plan.results_dir)
    kind = "ablation" if plan.kind == "ablation" else "grid"
    status = PhaseStatus(study_name, ",".join(plan.tasks), kind, True)
    if kind == "grid":  # per task: a sweep over several tasks has a best lr on each
        per_task = {t: best_lrs(study, replace(plan, tasks=[t])) for t in plan.tasks}
        if len(per_task) == 1:
            status.best = next(iter(per_task.values()))
        elif any(per_task.values()):
            status.best = {f"{t} {m}": lr for t, b in per_task.items() for m, lr in (b or {}).items()}  # fmt: skip
    _plan_points(status, plan, study.get_trials(deepcopy=False), results)
    if tasks:
        status.points = [p for p in status.points if p.task in tasks]
    return StudyStatus(results, url, [status], tracking.this_machine())


def _fill(ps: PointStatus, trials: list) -> None:
    """The point's state from its trials: the most advanced one."""
    from optuna.trial import TrialState

    rank = {"not enqueued": 0, "failed": 1, "waiting": 2, "interrupted": 3, "running": 4,
            "diverged": 5, "no metric": 5, "done": 5}  # fmt: skip
    for t in trials:
        outcome = t.user_attrs.get("outcome")
        if is_final(t):
            s = "done" if t.state == TrialState.COMPLETE else "diverged" if outcome == "diverged" else "no metric"  # fmt: skip
        elif t.state == TrialState.RUNNING:
            s = "running"
        elif t.state == TrialState.WAITING:
            s = "interrupted" if is_retry(t) else "waiting"
        elif t.state == TrialState.FAIL:
            s = "failed"
        else:
            continue  # a pruned duplicate says nothing about the point
        if rank[s] > rank[ps.state]:
            ps.state = s
            ps.value = t.values[0] if s == "done" and t.values else None
            ps.detail = f"last attempt: {outcome}" if s == "failed" and outcome else ""
            ps.memory_key = t.user_attrs.get("memory_key") or ps.memory_key
            who = t.user_attrs.get("worker") or {}
            ps.worker = f"{who.get('host')}:{who.get('pid')}" if s == "running" and who else None
