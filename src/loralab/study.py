"""Studies described in YAML (`loralab study SPEC.yaml`): the spec, its phases, the runner.

A spec names tasks (data, caps, epochs, length), methods, a learning-rate grid per method,
seeds, how the learning rate is chosen, and ablation axes over any `lora.*` key. It becomes
Optuna studies of ordinary sweep plans (`sweep.Plan`), per task:

- `<name>-<task>-grid`: every method × its lr grid × the grid seeds (the first seed with
  `grid_on_first_seed`, every seed with `full_grid`);
- `<name>-<task>-seeds` (grid_on_first_seed): the other seeds at each method's best lr, made
  once the grid is complete;
- `<name>-<task>-ablate-<axis>`: LoRA at each value of the axis, at the grid's best LoRA lr
  (made once the grid is complete) or at an explicit lr.

Every point is a run directory RESULTS/runs/<key>; a point that equals one of another phase
(the ablation's base value at the best lr and first seed is a grid point) reuses that run.
Dependent studies are deterministic functions of the stored grid results, so any worker may
create them and all of them create the same ones.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .config import LoraSettings as LoraConfig
from .config import from_dict, load_yaml, merge_dicts, to_dict, validate
from .errors import LoralabError
from .sweep import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_RETRY,
    Plan,
    create_or_check,
    is_final,
    open_storage,
    storage_url,
)

SELECTIONS = ("grid_on_first_seed", "full_grid")
METHODS = ("lora", "full")
TOP_KEYS = ("name", "output_dir", "data_root", "base", "tasks", "methods", "lr", "seeds",
            "lr_selection", "ablations")  # fmt: skip
# Per-task shorthands -> config keys; a task entry may also hold whole config sections.
TASK_KEYS = {
    "data_dir": "data.data_dir",
    "train_file": "data.train_file",
    "eval_file": "data.eval_file",
    "max_train_examples": "data.max_train_examples",
    "max_eval_examples": "data.max_eval_examples",
    "max_length": "data.max_length",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
}
SECTIONS = ("model", "lora", "data", "train", "tracking")
PATH_KEYS = ("data_dir", "train_file", "eval_file")
# Set per point by the study itself: a value in the spec could not be honoured.
FIXED = {
    "data.task": "the task is the key under `tasks:`",
    "train.method": "methods are listed under `methods:`",
    "train.lr": "learning rates are listed under `lr:` (per method) or an ablation's `lr:`",
    "train.seed": "seeds are listed under `seeds:` (or an ablation's `seeds:`)",
}
ABLATION_OPTIONS = ("scale_alpha", "seeds", "lr", "tasks", "name")
AXIS_NAMES = {"lora.r": "rank", "lora.alpha": "alpha", "lora.target": "modules"}


@dataclass
class Ablation:
    """One axis: LoRA runs at each value of `key` (a lora.* key), all else as the base."""

    key: str
    values: list
    name: str
    scale_alpha: bool = False
    seeds: list[int] | None = None  # None = the study's first seed
    lr: float | None = None  # None = the grid's best LoRA lr per task
    tasks: list[str] | None = None  # None = every task


@dataclass
class StudySpec:
    """A validated study spec (see the module docstring and configs/studies/)."""

    name: str
    path: str
    output_dir: str
    base: dict
    tasks: dict[str, dict]  # task -> partial config (paths already joined onto data_root)
    methods: list[str]
    lrs: dict[str, list[float]]
    seeds: list[int]
    lr_selection: str = "grid_on_first_seed"
    ablations: list[Ablation] = field(default_factory=list)

    @property
    def grid_seeds(self) -> list[int]:
        return self.seeds[:1] if self.lr_selection == "grid_on_first_seed" else list(self.seeds)


# ---------------------------------------------------------------------------------------------
# Loading and validation


def _err(path, key: str, text: str) -> LoralabError:
    return LoralabError(f"Study spec '{path}': '{key}' {text}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "extra":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_sections(path, where: str, data: dict) -> None:
    """Config sections only, none of the keys the study sets per point."""
    for k, v in data.items():
        if k not in SECTIONS:
            raise _err(path, f"{where}.{k}", f"is not a config section here: use {', '.join(SECTIONS)} (the run section is set by the study: use --output-dir).")  # fmt: skip
        if not isinstance(v, dict):
            raise _err(path, f"{where}.{k}", f"must be a mapping of {k}.* keys, got {v!r}.")
    for k in _flat(data):
        if k in FIXED:
            raise _err(path, f"{where}.{k}", f"cannot be set in a study: {FIXED[k]}.")
    try:
        from_dict(data)
    except LoralabError as e:
        raise LoralabError(f"Study spec '{path}', in '{where}': {e}") from None


def _numbers(path, key: str, value, kind: type) -> list:
    if not isinstance(value, list) or not value:
        raise _err(path, key, f"must be a non-empty list, e.g. [1e-4, 3e-4]; got {value!r}.")
    out = []
    for v in value:
        try:
            if isinstance(v, bool) or (kind is int and isinstance(v, float)):
                raise ValueError
            x = kind(v)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise _err(path, key, f"holds {v!r}, which is not a {kind.__name__}.") from None
        if kind is float and not (math.isfinite(x) and x > 0):
            raise _err(path, key, f"holds {v!r}: learning rates must be positive.")
        out.append(x)
    if len(set(out)) != len(out):
        raise _err(path, key, f"repeats a value: {value!r}.")
    return out


def _join(root: str | None, value: str | None) -> str | None:
    """Relative data paths join onto data_root; both stay as written (relative to the CWD)."""
    if value is None or root is None or Path(value).is_absolute():
        return value
    return str(Path(root) / value)


def _task_config(path, name: str, entry, data_root: str | None) -> dict:
    from .tasks import get_task

    try:
        get_task(name)
    except LoralabError as e:
        raise _err(path, f"tasks.{name}", f"is not a task: {e}") from None
    entry = entry or {}
    if not isinstance(entry, dict):
        raise _err(path, f"tasks.{name}", f"must be a mapping (data_dir, caps, epochs, ...), got {entry!r}.")  # fmt: skip
    sections, short = {}, {}
    for k, v in entry.items():
        if k in TASK_KEYS:
            section, key = TASK_KEYS[k].split(".")
            short.setdefault(section, {})[key] = v
        elif k in SECTIONS:
            sections[k] = v
        else:
            raise _err(path, f"tasks.{name}.{k}", f"is not a task setting: use {', '.join(TASK_KEYS)} or a config section ({', '.join(SECTIONS)}).")  # fmt: skip
    _check_sections(path, f"tasks.{name}", sections)
    cfg = merge_dicts(sections, short)
    _check_sections(path, f"tasks.{name}", cfg)
    _join_paths(cfg, data_root)
    return cfg


def _join_paths(cfg: dict, data_root: str | None) -> None:
    """The data paths of a config mapping (in place), joined onto data_root."""
    data = cfg.get("data") or {}
    for k in PATH_KEYS:
        if data.get(k) is not None:
            data[k] = _join(data_root, str(data[k]))


def _ablation(path, i: int, entry, spec_tasks: list[str], methods: list[str]) -> Ablation:
    where = f"ablations[{i}]"
    if not isinstance(entry, dict):
        raise _err(path, where, f"must be a mapping like {{lora.r: [4, 8, 16], scale_alpha: true}}, got {entry!r}.")  # fmt: skip
    axes = [k for k in entry if k not in ABLATION_OPTIONS]
    if len(axes) != 1 or not axes[0].startswith("lora."):
        raise _err(path, where, f"must name exactly one lora.* axis (e.g. lora.r: [4, 8, 16]) besides the options {', '.join(ABLATION_OPTIONS)}; it has {axes or 'none'}.")  # fmt: skip
    key = axes[0]
    field_name = key.split(".", 1)[1]
    if field_name not in LoraConfig.__dataclass_fields__:
        raise _err(path, f"{where}.{key}", f"is not a LoRA setting: use one of lora.{', lora.'.join(LoraConfig.__dataclass_fields__)}.")  # fmt: skip
    values = entry[key]
    if not isinstance(values, list) or not values:
        raise _err(path, f"{where}.{key}", f"must be a non-empty list of values, got {values!r}.")  # fmt: skip
    for v in values:
        try:
            validate(from_dict({"lora": {field_name: v}}))
        except LoralabError as e:
            raise LoralabError(f"Study spec '{path}', in '{where}.{key}': {e}") from None
    scale = entry.get("scale_alpha", False)
    if not isinstance(scale, bool) or (scale and key != "lora.r"):
        raise _err(path, f"{where}.scale_alpha", "must be true or false, and only goes with lora.r (alpha/r is kept at the base's).")  # fmt: skip
    seeds = entry.get("seeds")
    seeds = None if seeds is None else _numbers(path, f"{where}.seeds", seeds, int)
    lr = entry.get("lr", "best")
    if lr == "best":
        lr = None
        if "lora" not in methods:
            raise _err(path, f"{where}.lr", "is 'best' (the default), but the study has no LoRA grid to take it from: give a number, or add lora to methods.")  # fmt: skip
    else:
        lr = _numbers(path, f"{where}.lr", [lr], float)[0]
    tasks = entry.get("tasks")
    if tasks is not None:
        if not isinstance(tasks, list) or not tasks or set(tasks) - set(spec_tasks):
            raise _err(path, f"{where}.tasks", f"must be a non-empty list of the study's tasks ({', '.join(spec_tasks)}), got {tasks!r}.")  # fmt: skip
    name = str(entry.get("name") or AXIS_NAMES.get(key, field_name))
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise _err(path, f"{where}.name", f"must be letters, digits and _.+- only, got {name!r}.")
    return Ablation(key, values, name, scale, seeds, lr, tasks)


def load_spec(path: str | Path, data_root: str | None = None) -> StudySpec:
    """Read and validate a study spec; `data_root` replaces the spec's (relative to the CWD)."""
    raw = load_yaml(path)
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise _err(path, unknown[0], f"is not a study setting; known: {', '.join(TOP_KEYS)}.")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise _err(path, "name", f"must be a name of letters, digits and _.- (it names the study and its folder), got {name!r}.")  # fmt: skip
    root = data_root if data_root is not None else raw.get("data_root")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise _err(path, "base", f"must be a mapping of config sections, got {base!r}.")
    _check_sections(path, "base", base)
    _join_paths(base, None if root is None else str(root))
    tasks = raw.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise _err(path, "tasks", "must map at least one task name to its settings (sst2: {data_dir: ...}).")  # fmt: skip
    per_task = {t: _task_config(path, t, e, None if root is None else str(root)) for t, e in tasks.items()}  # fmt: skip
    methods = raw.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods or set(methods) - set(METHODS) or len(set(methods)) != len(methods):  # fmt: skip
        raise _err(path, "methods", f"must be a list of lora and/or full, got {methods!r}.")
    lr = raw.get("lr")
    if not isinstance(lr, dict) or set(lr) != set(methods):
        raise _err(path, "lr", f"must give a learning-rate list for each method ({', '.join(methods)}), e.g. lr: {{lora: [1e-4, 3e-4], full: [1e-5, 3e-5]}}; got {lr!r}.")  # fmt: skip
    lrs = {m: _numbers(path, f"lr.{m}", lr[m], float) for m in methods}
    seeds = _numbers(path, "seeds", raw.get("seeds"), int)
    selection = raw.get("lr_selection", SELECTIONS[0])
    if selection not in SELECTIONS:
        raise _err(path, "lr_selection", f"must be {' or '.join(SELECTIONS)}, got {selection!r}.")
    abl = raw.get("ablations") or []
    if not isinstance(abl, list):
        raise _err(path, "ablations", f"must be a list of axes, got {abl!r}.")
    ablations = [_ablation(path, i, e, list(per_task), methods) for i, e in enumerate(abl)]
    names = [a.name for a in ablations]
    if len(set(names)) != len(names):
        raise _err(path, "ablations", f"has two axes named alike ({names}): give one a `name:`.")
    out = raw.get("output_dir") or str(Path("results") / name)
    spec = StudySpec(name, str(path), str(out), base, per_task, methods, lrs, seeds, selection, ablations)  # fmt: skip
    first = {m: v[0] for m, v in lrs.items()}
    for phase in phases(spec):  # every config valid now, not on some machine hours later
        plan = phase.plan(spec, first)
        for p in plan.points():
            try:
                validate(plan.config_for(p))
            except LoralabError as e:
                raise LoralabError(f"Study spec '{path}', point {p['key']}: {e}") from None
    return spec


def select_tasks(spec: StudySpec, tasks: list[str] | None) -> list[str]:
    """The spec's tasks that `--tasks` selects (all without it); unknown names are errors."""
    unknown = sorted(set(tasks or []) - set(spec.tasks))
    if unknown:
        raise LoralabError(
            f"--tasks {','.join(unknown)}: not in the study spec (its tasks: "
            f"{', '.join(spec.tasks)})."
        )
    return [t for t in spec.tasks if not tasks or t in tasks]


def check_data(spec: StudySpec, tasks: list[str]) -> None:
    """Every local data path of the selected tasks exists (before anything is created)."""
    for t in tasks:
        data = merge_dicts(spec.base, spec.tasks[t]).get("data", {})
        for k in PATH_KEYS:
            if data.get(k) and not Path(data[k]).expanduser().exists():
                raise LoralabError(
                    f"Study spec '{spec.path}': tasks.{t}.{k} is '{data[k]}', which does not "
                    f"exist (relative paths are relative to the current folder, {Path.cwd()}, "
                    "joined onto data_root when the spec has one). Run from the folder the spec "
                    "expects, or give --data-root."
                )


# ---------------------------------------------------------------------------------------------
# Phases: grid, other seeds, ablations


def _lora_of(spec: StudySpec, task: str) -> dict:
    """The task's effective LoRA section (base <- per-task)."""
    data = merge_dicts(spec.base, spec.tasks[task])
    return to_dict(from_dict({"lora": data.get("lora", {})}).lora)


def ablation_variants(spec: StudySpec, task: str, abl: Ablation) -> list[dict]:
    """Each axis value as the diff of LoRA settings from the task's base (deduplicated)."""
    base = _lora_of(spec, task)
    field_name = abl.key.split(".", 1)[1]
    out = []
    for v in abl.values:
        lora = dict(base, **{field_name: v})
        if abl.scale_alpha:
            lora["alpha"] = float(base["alpha"]) * float(v) / base["r"]
        full = to_dict(from_dict({"lora": lora}).lora)  # normalised types (16 -> 16.0)
        diff = {k: full[k] for k in full if full[k] != base[k]}
        if diff not in out:
            out.append(diff)
    return out


@dataclass
class Phase:
    """One Optuna study of the spec: a task's grid, its other seeds, or one ablation."""

    task: str
    kind: str  # grid / seeds / ablation
    ablation: Ablation | None = None

    def study_name(self, prefix: str) -> str:
        tail = f"ablate-{self.ablation.name}" if self.ablation else self.kind
        return f"{prefix}-{self.task}-{tail}"

    @property
    def needs_grid(self) -> bool:
        return self.kind == "seeds" or (self.ablation is not None and self.ablation.lr is None)

    def plan(self, spec: StudySpec, best: dict[str, float] | None, results_dir: str | None = None) -> Plan:  # fmt: skip
        """The phase's sweep plan; `best` = the grid's best lr per method (dependent phases)."""
        # The spec's own keys, not every config default: a later loralab that adds a config key
        # must still recognise the stored study. The model is spelt out: the keys name it.
        model = from_dict(merge_dicts(spec.base, spec.tasks[self.task])).model
        base = merge_dicts(spec.base, {"model": {"name": model.name, "head": model.head}})
        if self.kind == "grid":
            methods, lrs, seeds, variants = spec.methods, spec.lrs, spec.grid_seeds, [{}]
            kind, abl_name = "sweep", None
        elif self.kind == "seeds":
            methods, seeds, variants = spec.methods, spec.seeds[1:], [{}]
            lrs = {m: [best[m]] for m in methods}
            kind, abl_name = "sweep", None
        else:
            a = self.ablation
            methods, seeds = ["lora"], a.seeds or spec.seeds[:1]
            lrs = {"lora": [a.lr if a.lr is not None else best["lora"]]}
            variants = ablation_variants(spec, self.task, a)
            kind, abl_name = "ablation", a.name
        return Plan(
            kind=kind, ablation=abl_name, tasks=[self.task], methods=list(methods), lrs=lrs,
            seeds=list(seeds), variants=variants, base=base,
            per_task={self.task: spec.tasks[self.task]},
            results_dir=str(results_dir or spec.output_dir), slugged=True,
        )  # fmt: skip


def phases(spec: StudySpec, tasks: list[str] | None = None) -> list[Phase]:
    """Grids first (everything else waits on them), then other seeds, then ablations."""
    sel = [t for t in spec.tasks if not tasks or t in tasks]
    out = [Phase(t, "grid") for t in sel]
    if spec.lr_selection == "grid_on_first_seed" and len(spec.seeds) > 1:
        out += [Phase(t, "seeds") for t in sel]
    for a in spec.ablations:
        out += [Phase(t, "ablation", a) for t in sel if not a.tasks or t in a.tasks]
    return out


def best_lrs(study, plan: Plan) -> dict[str, float] | None:
    """Each method's lr with the best mean dev value over the grid seeds; None until every
    grid point is final. A diverged point counts as the worst value; ties go to the first lr."""
    values: dict[str, float | None] = {p["key"]: None for p in plan.points()}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("point")
        if key in values and is_final(t):
            v = t.values[0] if t.values else None
            values[key] = v if v is not None and math.isfinite(v) else -math.inf
    if any(v is None for v in values.values()):
        return None
    best = {}
    for m in plan.methods:
        scores = []
        for lr in plan.lrs[m]:
            vals = [values[p["key"]] for p in plan.points() if p["method"] == m and p["lr"] == lr]
            scores.append((sum(vals) / len(vals), lr))
        best[m] = max(scores, key=lambda s: s[0])[1]  # max keeps the first of equal scores
    return best


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class StudyOutcome:
    lines: list[str]
    unfinished: list[str]  # study names with points not done
    report: object | None = None


def dry_run(spec: StudySpec, tasks: list[str] | None, prefix: str) -> list[str]:
    """The points of every phase; dependent ones shown with the lr they will wait for."""
    lines = []
    for ph in phases(spec, select_tasks(spec, tasks)):
        first = {m: v[0] for m, v in spec.lrs.items()}
        pts = ph.plan(spec, first).points()
        when = " (lr: the grid's best per method, once the grid is complete)" if ph.needs_grid else ""  # fmt: skip
        lines.append(f"{ph.study_name(prefix)}: {len(pts)} points{when}")
        for p in pts:
            key = p["key"]
            if ph.needs_grid:
                key = re.sub(r"-lr.+?(?=-s\d+(-|$))", "-lr<best>", key)
            lines.append(f"  {key}")
    return lines


class _Runner:
    """Round-robin over the phases' studies: one point at a time, grids first."""

    def __init__(self, spec, storage, prefix, tasks, results_dir, heartbeat, quiet, trust=False):
        self.spec, self.storage, self.prefix = spec, storage, prefix
        self.results_dir, self.heartbeat, self.quiet = results_dir, heartbeat, quiet
        self.phases = phases(spec, tasks)
        self.workers: dict[str, object] = {}
        self.trust_remote_code = trust  # from the command line only, never from the spec
        self.poll = max(1.0, min(5.0, float(heartbeat)))

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.prefix}] {text}", file=sys.stderr, flush=True)

    def worker(self, ph: Phase):
        """The phase's worker, creating its study when it can be made; None while it waits."""
        from .worker import Worker

        name = ph.study_name(self.prefix)
        if name in self.workers:
            return self.workers[name]
        best = None
        if ph.needs_grid:
            grid = self.worker(Phase(ph.task, "grid"))
            best = best_lrs(grid.study, grid.plan)
            if best is None:
                return None
            self.say(f"{ph.task}: best lr from the grid {best}; enqueuing {name}")
        plan = ph.plan(self.spec, best, self.results_dir)
        create_or_check(self.storage, name, plan)
        w = Worker(self.storage, name, [ph.task], self.results_dir, self.heartbeat, self.quiet,
                   self.trust_remote_code)  # fmt: skip
        self.workers[name] = w
        return w

    def run(self) -> list[str]:
        while True:
            waiting = False
            ran = False
            for ph in self.phases:
                w = self.worker(ph)
                if w is None:
                    grid = self.worker(Phase(ph.task, "grid"))
                    waiting |= "active" in grid.states().values()
                    continue
                if w.step():
                    ran = True
                    break  # back to the first phase: grids before dependents
                waiting |= "active" in w.states().values()
            if ran:
                continue
            if not waiting:
                break
            time.sleep(self.poll)  # others hold the rest, or a grid is still being finished
        return self.summary()

    def summary(self) -> list[str]:
        lines, self.unfinished = [], []
        for ph in self.phases:
            name = ph.study_name(self.prefix)
            w = self.workers.get(name)
            if w is None:
                lines.append(f"study '{name}': not started (its task's grid has unfinished points)")  # fmt: skip
                self.unfinished.append(name)
                continue
            w.report.states = w.states()
            lines.append(w.report.line())
            if w.report.unfinished:
                self.unfinished.append(name)
        return lines


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

    check_data(spec, select_tasks(spec, tasks))
    results = str(output_dir or spec.output_dir)
    st = open_storage(storage_url(storage, results), heartbeat, grace, max_retry)
    runner = _Runner(
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
    rep = write_study_report(results)
    return StudyOutcome(lines, runner.unfinished, rep)


def write_study_report(results: str | Path):
    """The report of every finished run under `results` (RESULTS/report), one writer at a time."""
    from .report import load_runs, write_report

    root = Path(results)
    lock = root / "locks" / "report.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # workers finishing together take turns
        records = load_runs(root)
        if not records:
            return None
        return write_report(records, root / "report", f"run directories under {root}")
    finally:
        os.close(fd)
