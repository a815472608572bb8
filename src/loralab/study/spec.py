"""Studies described in YAML (`loralab study SPEC.yaml`): reading and validating a spec.

A spec names tasks (data, caps, epochs, length; optionally their own lr grids and seeds), methods, a
learning-rate grid per method, seeds, how the learning rate is chosen, and ablation axes over
any `lora.*` key. It becomes
Optuna studies of ordinary sweep plans, one per phase (`phases.py`); `runner.py` runs them.

Every point is a run directory RESULTS/runs/<key>; a point that equals one of another phase
(the ablation's base value at the best lr and first seed is a grid point) reuses that run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..config import LoraSettings as LoraConfig
from ..config import from_dict, load_yaml, merge_dicts, validate
from ..errors import LoralabError
from ..heads import check_config
from ..tasks import get_task
from .grid import PATH_KEYS
from .phases import Ablation, StudySpec, phases

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
# Set per point by the study itself: a value in the spec could not be honoured.
FIXED = {
    "data.task": "the task is the key under `tasks:`",
    "train.method": "methods are listed under `methods:`",
    "train.lr": "learning rates are listed under `lr:` (per method; a task's own `lr:` replaces "
    "it for that task) or an ablation's `lr:`",
    "train.seed": "seeds are listed under `seeds:` (a task's own `seeds:` replaces it for that "
    "task; an ablation has its own `seeds:`)",
}
ABLATION_OPTIONS = ("scale_alpha", "seeds", "lr", "lr_selection", "tasks", "name")
AXIS_NAMES = {"lora.r": "rank", "lora.alpha": "alpha", "lora.target": "modules", "lora": "variants"}


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
        example = "[42, 1337]" if kind is int else "[1e-4, 3e-4]"
        raise _err(path, key, f"must be a non-empty list, e.g. {example}; got {value!r}.")
    out = []
    for v in value:
        try:
            if isinstance(v, bool) or (kind is int and isinstance(v, float)):
                raise ValueError
            x = kind(v)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise _err(path, key, f"holds {v!r}, which is not {'an integer' if kind is int else 'a number'}.") from None  # fmt: skip
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
    if not isinstance(name, str):
        raise _err(path, f"tasks.{name}", "is not a task name: task names are words (sst2, mrpc, rte, squad_v2, or a task file's).")  # fmt: skip
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
            raise _err(path, f"tasks.{name}.{k}", f"is not a task setting: use {', '.join(TASK_KEYS)}, lr, seeds, or a config section ({', '.join(SECTIONS)}).")  # fmt: skip
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


def _ablation(path, i: int, entry, spec_tasks: list[str], methods: list[str], selection: str) -> Ablation:  # fmt: skip
    where = f"ablations[{i}]"
    if not isinstance(entry, dict):
        raise _err(path, where, f"must be a mapping like {{lora.r: [4, 8, 16], scale_alpha: true}}, got {entry!r}.")  # fmt: skip
    axes = [k for k in entry if k not in ABLATION_OPTIONS]
    if len(axes) != 1 or not (axes[0].startswith("lora.") or axes[0] == "lora"):
        raise _err(path, where, f"must name exactly one lora.* axis (e.g. lora.r: [4, 8, 16]), or `lora:` with a list of variants (mappings of lora.* settings), besides the options {', '.join(ABLATION_OPTIONS)}; it has {axes or 'none'}.")  # fmt: skip
    key = axes[0]
    field_name = key.split(".", 1)[1] if key != "lora" else None
    if field_name is not None and field_name not in LoraConfig.__dataclass_fields__:
        raise _err(path, f"{where}.{key}", f"is not a LoRA setting: use one of lora.{', lora.'.join(LoraConfig.__dataclass_fields__)}.")  # fmt: skip
    values = entry[key]
    if not isinstance(values, list) or not values:
        raise _err(path, f"{where}.{key}", f"must be a non-empty list of values, got {values!r}.")  # fmt: skip
    if field_name is None and not all(isinstance(v, dict) for v in values):
        raise _err(path, f"{where}.lora", f"must list variants as mappings of LoRA settings (e.g. {{}} for the base, {{use_dora: true}}), got {values!r}.")  # fmt: skip
    for v in values:
        try:
            validate(from_dict({"lora": v if field_name is None else {field_name: v}}))
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
    else:  # one rate, or a grid: every value runs at each, and keeps its own best (on dev)
        lr = _numbers(path, f"{where}.lr", lr if isinstance(lr, list) else [lr], float)
    tasks = entry.get("tasks")
    if tasks is not None:
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks) or set(tasks) - set(spec_tasks):  # fmt: skip
            raise _err(path, f"{where}.tasks", f"must be a non-empty list of the study's tasks ({', '.join(spec_tasks)}), got {tasks!r}.")  # fmt: skip
    # An axis with its own lr grid chooses rates as the spec does, unless it says otherwise.
    own = entry.get("lr_selection", selection)
    if own not in SELECTIONS or ("lr_selection" in entry and (lr is None or len(lr) < 2)):
        raise _err(path, f"{where}.lr_selection", f"must be {' or '.join(SELECTIONS)}, and goes with an lr grid of two or more rates on the axis (lr: [3.0e-4, 1.0e-3]); got {own!r} with lr {entry.get('lr', 'best')!r}.")  # fmt: skip
    name = str(entry.get("name") or AXIS_NAMES.get(key, field_name))
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise _err(path, f"{where}.name", f"must be letters, digits and _.+- only, got {name!r}.")
    return Ablation(key, values, name, scale, seeds, lr, tasks, own)


def load_spec(path: str | Path, data_root: str | None = None) -> StudySpec:
    """Read and validate a study spec; `data_root` replaces the spec's (relative to the CWD)."""
    raw = load_yaml(path, "Study spec", "configs/studies/tiny.yaml")
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
    task_lr = {t: e.pop("lr") for t, e in tasks.items() if isinstance(e, dict) and "lr" in e}
    task_seed = {t: e.pop("seeds") for t, e in tasks.items() if isinstance(e, dict) and "seeds" in e}  # fmt: skip
    per_task = {t: _task_config(path, t, e, None if root is None else str(root)) for t, e in tasks.items()}  # fmt: skip
    methods = raw.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods) or set(methods) - set(METHODS) or len(set(methods)) != len(methods):  # fmt: skip
        raise _err(path, "methods", f"must be a list of lora and/or full, got {methods!r}.")
    lr = raw.get("lr")
    if not isinstance(lr, dict) or set(lr) != set(methods):
        raise _err(path, "lr", f"must give a learning-rate list for each method ({', '.join(methods)}), e.g. lr: {{lora: [1e-4, 3e-4], full: [1e-5, 3e-5]}}; got {lr!r}.")  # fmt: skip
    lrs = {m: _numbers(path, f"lr.{m}", lr[m], float) for m in methods}
    task_lrs = {}
    for t, v in task_lr.items():  # a task's own grid, for some or all methods
        if not isinstance(v, dict) or not v or set(v) - set(methods):
            raise _err(path, f"tasks.{t}.lr", f"must map some of the methods ({', '.join(methods)}) to learning-rate lists, e.g. lr: {{lora: [3e-4, 1e-3, 3e-3]}}; got {v!r}.")  # fmt: skip
        task_lrs[t] = {m: _numbers(path, f"tasks.{t}.lr.{m}", v[m], float) for m in v}
    seeds = _numbers(path, "seeds", raw.get("seeds"), int)
    task_seeds = {t: _numbers(path, f"tasks.{t}.seeds", v, int) for t, v in task_seed.items()}
    selection = raw.get("lr_selection", SELECTIONS[0])
    if selection not in SELECTIONS:
        raise _err(path, "lr_selection", f"must be {' or '.join(SELECTIONS)}, got {selection!r}.")
    abl = raw.get("ablations") or []
    if not isinstance(abl, list):
        raise _err(path, "ablations", f"must be a list of axes, got {abl!r}.")
    ablations = [_ablation(path, i, e, list(per_task), methods, selection) for i, e in enumerate(abl)]  # fmt: skip
    names = [a.name for a in ablations]
    if len(set(names)) != len(names):
        raise _err(path, "ablations", f"has two axes named alike ({names}): give one a `name:`.")
    out = raw.get("output_dir") or str(Path("results") / name)
    spec = StudySpec(name, str(path), str(out), base, per_task, methods, lrs, seeds, selection, ablations, task_lrs, task_seeds)  # fmt: skip
    studies = [ph.study_name(name) for ph in phases(spec)]
    if alike := sorted({s for s in studies if studies.count(s) > 1}):
        raise _err(path, "ablations", f"names two studies alike ({alike[0]}): an axis whose lr grid runs on its first seed has its other seeds in the study '<axis>-seeds'; give the axis named like that another `name:`.")  # fmt: skip
    for phase in phases(spec):  # every config valid now, not on some machine hours later
        plan = phase.plan(spec)
        for p in plan.points():
            try:
                cfg = plan.config_for(p)
                validate(cfg)
                check_config(cfg)
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
        task = data.get("task") or t  # the evaluation file paired with the training file
        get_task(task).eval_file_for(data.get("train_file"), data.get("eval_file"))


def with_lr_placeholder(key: str) -> str:
    """A point key with its lr shown as `<best>` (for points that wait on the grid's choice)."""
    return re.sub(r"-lr.+?(?=-s\d+(-|$))", "-lr<best>", key)


def dry_run(spec: StudySpec, tasks: list[str] | None, prefix: str) -> list[str]:
    """The points of every phase; dependent ones shown with the lr they will wait for."""
    lines = []
    for ph in phases(spec, select_tasks(spec, tasks)):
        pts = ph.plan(spec).points()
        when = f" (lr: {ph.waits_on}, once chosen)" if ph.depends_on else ""
        lines.append(f"{ph.study_name(prefix)}: {len(pts)} point{'s' * (len(pts) != 1)}{when}")
        for p in pts:
            key = p["key"]
            if ph.depends_on:
                key = with_lr_placeholder(key)
            lines.append(f"  {key}")
    return lines


def spec_configs(spec: StudySpec, tasks: list[str]) -> list:
    """Every point's config of the spec's phases (dependent phases at the grid's first lr: the
    learning rate changes neither the model nor the targets), for `prechecks.check_points`."""
    out = []
    for ph in phases(spec, tasks):
        plan = ph.plan(spec)
        out += [plan.config_for(p) for p in plan.points()]
    return out
