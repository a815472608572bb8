"""Sweeps and ablations as Optuna studies: the grid, the storage, creating and checking a study.

A study is a fixed grid of points (task × method × learning rate × seed × LoRA variant). Every
point is one ordinary `train` run with a deterministic run directory, RESULTS/runs/<point key>.
The grid, the base config and the results folder are stored in the study (user attribute
`loralab`), so a worker on another machine needs only the study name and the storage URL.
Grid points are Optuna trials enqueued in WAITING state; `worker.py` claims and runs them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ExperimentConfig, build_config, from_dict, merge_dicts, parse_overrides
from .errors import LoralabError

DEFAULT_LR = {"lora": [1e-4, 3e-4], "full": [1e-5, 3e-5]}
DEFAULT_SEEDS = [42, 1337, 2024]
ABLATIONS = ("rank", "alpha", "modules", "all")
RANKS = (4, 8, 16)  # alpha = 2·r in the rank ablation
ALPHAS = (8.0, 16.0, 32.0)  # at r = 8
PRESETS = ("standard", "extended", "all-linear")
STUDY_ATTR = "loralab"
PLAN_VERSION = 1
DEFAULT_HEARTBEAT = 20  # seconds between a worker's heartbeats
DEFAULT_MAX_RETRY = 3  # a point whose worker dies more often than this is left failed


@dataclass
class Plan:
    """Everything a worker needs to run any point of a study."""

    kind: str  # "sweep" or "ablation"
    ablation: str | None
    tasks: list[str]
    methods: list[str]
    lrs: dict[str, list[float]]
    seeds: list[int]
    variants: list[dict]  # LoRA settings {r, alpha, target}; a sweep has one
    base: dict  # ExperimentConfig as a dict, without the `run` section
    per_task: dict = field(default_factory=dict)  # task -> partial config mapping
    results_dir: str = "results"
    slugged: bool = False  # variants: any lora.* settings (diff from the base), slugged in keys

    @property
    def group(self) -> str:
        """The report section this study's runs belong to."""
        return "sweep" if self.kind == "sweep" else f"ablation-{self.ablation}"

    def points(self) -> list[dict]:
        """The grid, seed-major, so that a stopped sweep already has whole seeds."""
        out = []
        for task in self.tasks:
            for seed in self.seeds:
                for method in self.methods:
                    for lr in self.lrs.get(method, []):
                        for v in self.variants if method == "lora" else [{}]:
                            if self.slugged:
                                p = {"task": task, "method": method, "lr": lr, "seed": seed,
                                     "lora": dict(v)}  # fmt: skip
                            else:
                                p = {"task": task, "method": method, "lr": lr, "seed": seed,
                                     "r": v.get("r"), "alpha": v.get("alpha"), "target": v.get("target")}  # fmt: skip
                            p["key"] = point_key(p, self.base)
                            out.append(p)
        return out

    def fingerprint(self) -> str:
        """Identifies the grid and the settings of every run (not the results folder)."""
        data = {
            "v": PLAN_VERSION,
            "points": self.points(),
            "base": self.base,
            "per_task": self.per_task,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, **asdict(self), "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        if data.get("version") != PLAN_VERSION:
            raise LoralabError(
                f"The study was made by another loralab version (plan version {data.get('version')}, "
                f"this one reads {PLAN_VERSION}): run it with that version."
            )
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def config_for(self, point: dict, results_dir: str | Path | None = None) -> ExperimentConfig:
        """The full training config of one point, its run directory RESULTS/runs/<key>."""
        data = merge_dicts(self.base, self.per_task.get(point["task"], {}))
        fixed = {
            "data": {"task": point["task"]},
            "train": {"method": point["method"], "lr": point["lr"], "seed": point["seed"]},
            "run": {"output_dir": str(Path(results_dir or self.results_dir) / "runs"),
                    "name": point["key"]},
        }  # fmt: skip
        if "lora" in point:
            fixed["lora"] = point["lora"]
        elif point["method"] == "lora":
            fixed["lora"] = {k: point[k] for k in ("r", "alpha", "target")}
        return from_dict(merge_dicts(data, fixed))


def _slug(value) -> str:
    if isinstance(value, list):
        value = "+".join(map(str, value))
    if isinstance(value, float):
        value = f"{value:g}"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(value))


def point_key(point: dict, base: dict) -> str:
    """Deterministic run-directory name, e.g. sst2-lora-smollm2-135m-lr0.0003-s42-r8-a16-standard."""
    model = _slug(Path(base["model"]["name"]).name or base["model"]["name"])
    head = "-lm" if base["model"].get("head") == "lm" else ""
    from .tasks import task_label

    task = task_label(point["task"], unique=True)  # a custom task is a path: keep its name
    key = f"{task}-{point['method']}-{model}{head}-lr{point['lr']:g}-s{point['seed']}"
    if "lora" in point:
        return key + variant_slug(point["lora"])
    if point["method"] == "lora":
        key += f"-r{point['r']}-a{_slug(float(point['alpha']))}-{_slug(point['target'])}"
    return key


def variant_slug(diff: dict) -> str:
    """A readable, deterministic suffix for LoRA settings that differ from the base:
    {} -> '', {r: 16, alpha: 32} -> '-r16-a32', {use_dora: True} -> '-dora'."""
    from .config import LoraSettings as LoraConfig

    order = list(LoraConfig.__dataclass_fields__)
    parts = []
    for k in sorted(diff, key=lambda k: order.index(k) if k in order else len(order)):
        v = diff[k]
        if k in ("r", "alpha", "dropout"):
            parts.append(f"{k[0]}{_slug(float(v)) if k != 'r' else v}")
        elif k == "target":
            parts.append(_slug(v))
        elif k in ("use_dora", "use_rslora"):
            parts.append(k[4:] if v else f"no{k[4:]}")
        elif k == "init_lora_weights":
            parts.append(f"init-{_slug(v).lower()}")
        elif k == "extra":
            parts.append("extra-" + hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:8])  # fmt: skip
        else:
            parts.append(f"{k}-{_slug(v)}")
    return "".join(f"-{p}" for p in parts)


def ablation_variants(kind: str, base_lora: dict) -> list[dict]:
    """LoRA settings of an ablation: rank (alpha = 2r), alpha (r = 8), module preset, or all."""
    target = base_lora["target"]
    if kind == "rank":
        return [{"r": r, "alpha": 2.0 * r, "target": target} for r in RANKS]
    if kind == "alpha":
        return [{"r": 8, "alpha": a, "target": target} for a in ALPHAS]
    if kind == "modules":
        return [
            {"r": base_lora["r"], "alpha": float(base_lora["alpha"]), "target": p} for p in PRESETS
        ]
    if kind == "all":
        return [{"r": r, "alpha": a, "target": p} for r in RANKS for a in ALPHAS for p in PRESETS]
    raise LoralabError(f"Unknown ablation type '{kind}': choose one of {', '.join(ABLATIONS)}.")


AXIS_KEYS = {"rank": ("lora.r", "lora.alpha"), "alpha": ("lora.r", "lora.alpha"),
             "modules": ("lora.target",), "all": ("lora.r", "lora.alpha", "lora.target")}  # fmt: skip


def check_honoured(kind: str, ablation: str | None, glob: list[str], per_task: list[str]) -> None:
    """Overrides the grid would silently replace are errors, never ignored."""
    for item in glob + per_task:
        key = item.split("=", 1)[0].split(":")[-1].strip()  # per-task items: TASK:key=value
        if key.startswith("run."):
            raise LoralabError(
                f"{item} cannot be honoured: every point's run directory is RESULTS/runs/<point> "
                "(the results folder is --output-dir; the folder name is the point's key). Drop it."
            )
        if kind == "ablation" and key in AXIS_KEYS.get(ablation or "", ()):
            raise LoralabError(
                f"{item} cannot be honoured: the {ablation} ablation sets "
                f"{' and '.join(AXIS_KEYS[ablation])} per point. Drop it, or describe the values "
                "you want as an ablation axis in a study spec (`loralab study SPEC.yaml`)."
            )
    for item in per_task:
        key = item.split("=", 1)[0].split(":")[-1].strip()
        if key in ("lora.r", "lora.alpha", "lora.target"):
            raise LoralabError(
                f"{item} cannot be honoured: a sweep sets {key} per point from the common LoRA "
                "settings, the same for every task. Give it for every task (without the task "
                "prefix), or use a study spec with per-task settings."
            )


def parse_list(text: str | None, kind: type, name: str) -> list | None:
    """'1e-4,3e-4' -> [0.0001, 0.0003]; None stays None (use the default)."""
    if text is None:
        return None
    out = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        try:
            out.append(kind(item))
        except ValueError:
            raise LoralabError(f"{name}: '{item}' is not a {kind.__name__}.") from None
    return out


def make_plan(
    kind: str = "sweep",
    ablation: str | None = None,
    tasks: str | None = None,
    methods: str | None = None,
    lora_lr: str | None = None,
    full_lr: str | None = None,
    seeds: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    results_dir: str = "results",
    **sections: dict,
) -> Plan:
    """A validated plan from command-line style options (comma lists as strings).

    `overrides` are dotted keys for every point (train.max_steps=100) or, prefixed with a task
    and a colon, for one task's points (squad_v2:data.train_file=...).
    """
    from .config import to_dict
    from .tasks import absolute_ref, get_task

    glob, per_task_items = [], {}
    for item in overrides or []:
        head = item.split("=", 1)[0]
        if ":" in head:
            task, rest = item.split(":", 1)
            per_task_items.setdefault(task.strip(), []).append(rest)
        else:
            glob.append(item)
    grid_keys = {"train.lr": "--lora-lr/--full-lr", "train.seed": "--seeds",
                 "train.method": "--methods", "data.task": "--tasks"}  # fmt: skip
    for item in [*glob, *(x for v in per_task_items.values() for x in v)]:
        key = item.split("=", 1)[0].strip()
        if key in grid_keys:
            raise LoralabError(f"{key} is set per point by the grid: use {grid_keys[key]} instead.")
    check_honoured(kind, ablation, glob, [f"{t}:{x}" for t, v in per_task_items.items() for x in v])
    base_cfg = build_config(config, glob, **sections)
    task_list = parse_list(tasks, str, "--tasks")
    task_list = [base_cfg.data.task] if task_list is None else task_list
    task_list = [absolute_ref(t) for t in task_list]  # workers may run in another folder
    for t in [*task_list, *per_task_items]:
        get_task(t)
    strays = sorted(set(per_task_items) - set(task_list))
    if strays:
        raise LoralabError(f"Overrides for {', '.join(strays)}, which is not in the grid's tasks.")
    if kind == "ablation":
        method_list = ["lora"]
        variants = ablation_variants(ablation, asdict(base_cfg.lora))
    else:
        method_list = parse_list(methods, str, "--methods")
        method_list = ["lora", "full"] if method_list is None else method_list
        bad = [m for m in method_list if m not in DEFAULT_LR]
        if bad:
            raise LoralabError(f"--methods: unknown method(s) {bad}; use lora and/or full.")
        lo = base_cfg.lora
        variants = [{"r": lo.r, "alpha": float(lo.alpha), "target": lo.target}]
    lrs = {
        "lora": parse_list(lora_lr, float, "--lora-lr"),
        "full": parse_list(full_lr, float, "--full-lr"),
    }
    lrs = {m: DEFAULT_LR[m] if v is None else v for m, v in lrs.items() if m in method_list}
    seed_list = parse_list(seeds, int, "--seeds")
    base = to_dict(base_cfg)
    base.pop("run")
    plan = Plan(
        kind=kind, ablation=ablation, tasks=task_list, methods=method_list, lrs=lrs,
        seeds=DEFAULT_SEEDS if seed_list is None else seed_list, variants=variants, base=base,
        per_task={t: parse_overrides(v) for t, v in per_task_items.items()},
        results_dir=str(results_dir),
    )  # fmt: skip
    points = plan.points()
    if not points:
        empty = [n for n, v in (("tasks (--tasks)", plan.tasks), ("methods (--methods)", plan.methods),
                 ("seeds (--seeds)", plan.seeds)) if not v]  # fmt: skip
        empty += [f"{m} learning rates (--{m}-lr)" for m in plan.methods if not plan.lrs.get(m)]
        raise LoralabError(
            f"The grid is empty: no {' and no '.join(empty) or 'points'}. Give at least one value "
            "of each (defaults: tasks from the config, methods lora,full, seeds 42,1337,2024)."
        )
    keys = [p["key"] for p in points]
    if len(set(keys)) != len(keys):
        raise LoralabError("The grid repeats a point (a learning rate or seed given twice).")
    from .config import validate

    for p in points:  # fail now, not on some machine hours later
        validate(plan.config_for(p))
    return plan


# ---------------------------------------------------------------------------------------------
# Storage and studies


def _optuna():
    try:
        import optuna
    except ImportError:
        raise LoralabError(
            "Sweeps need Optuna: pip install 'loralab[sweep]' (optuna, psycopg2-binary)."
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(storage: str | None, results_dir: str | Path) -> str:
    """The given URL, or the embedded SQLite file RESULTS/study.db."""
    if storage:
        return storage
    path = Path(results_dir)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(path / 'study.db').resolve()}"


def masked(url: str) -> str:
    """The URL without its password (or other credentials), for messages."""
    from .redact import mask_secrets

    return mask_secrets(url)


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT, grace: int | None = None,
                 max_retry: int = DEFAULT_MAX_RETRY):  # fmt: skip
    """An RDB storage with heartbeats; a stale trial (its worker died) is re-enqueued."""
    import inspect

    optuna = _optuna()
    from optuna.storages import RDBStorage

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    retry_cls = retry_cls or optuna.storages.RetryFailedTrialCallback  # optuna < 4.9
    params = inspect.signature(RDBStorage).parameters
    cb_name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"  # fmt: skip
    url = _with_driver(url)
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
    "table studies already exists"); a file lock beside the database, dropped by the kernel."""
    if not url.startswith("sqlite:///"):
        yield
        return
    lock = Path(url[len("sqlite:///") :] + ".lock")
    if not lock.parent.is_dir():
        yield  # a bad path: RDBStorage says so
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _with_driver(url: str) -> str:
    """postgresql:// with the installed driver (SQLAlchemy 2.1 assumes psycopg 3 for it)."""
    import importlib.util

    if url.startswith(("postgresql://", "postgres://")):
        rest = url.split("://", 1)[1]
        for module, scheme in (
            ("psycopg2", "postgresql+psycopg2"),
            ("psycopg", "postgresql+psycopg"),
        ):
            if importlib.util.find_spec(module):
                return f"{scheme}://{rest}"
    return url


def describe_difference(old: Plan, new: Plan) -> str:
    """What changed between two plans, in a few words."""
    diffs = []
    for name in ("tasks", "methods", "lrs", "seeds", "variants", "per_task"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            diffs.append(f"{name}: {a} in the study, {b} now")
    flat_a, flat_b = _flatten(old.base), _flatten(new.base)
    keys = sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))
    diffs += [f"{k}: {flat_a.get(k)!r} in the study, {flat_b.get(k)!r} now" for k in keys[:6]]
    return "; ".join(diffs) or "the stored plan differs"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    raise LoralabError(f"Study '{name}' was not made by loralab (it has no stored grid).")


def create_or_check(storage, name: str, plan: Plan):
    """Create the study with its grid enqueued; an existing one must hold the same grid."""
    optuna = _optuna()
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study, stored = load_study(storage, name)
        if stored.fingerprint() != plan.fingerprint():
            raise LoralabError(
                f"Study '{name}' already exists in '{masked(storage.url)}' with a different grid "
                f"({describe_difference(stored, plan)}). It was left untouched. Re-run with the "
                "same options to continue it, or pick a new --study name."
            ) from None
    else:
        study.set_user_attr(STUDY_ATTR, plan.to_json())
    ensure_enqueued(study, plan)
    return study


def ensure_enqueued(study, plan: Plan, tasks: list[str] | None = None) -> int:
    """Enqueue every point (of `tasks`) that has no waiting, running or finished trial."""
    from optuna.trial import TrialState

    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    covered = {t.user_attrs.get("point") for t in study.get_trials(deepcopy=False)
               if t.state in live or is_final(t)}  # fmt: skip
    n = 0
    for p in plan.points():
        if p["key"] not in covered and (not tasks or p["task"] in tasks):
            study.enqueue_trial({}, user_attrs={"point": p["key"], "task": p["task"]})
            n += 1
    return n


def is_final(trial) -> bool:
    """A point that is done: completed, or diverged (re-running it would diverge again)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and trial.user_attrs.get("outcome") == "diverged"
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


# ---------------------------------------------------------------------------------------------
# Running


def default_study_name(plan: Plan) -> str:
    from .tasks import task_label

    kind = "sweep" if plan.kind == "sweep" else f"ablate-{plan.ablation}"
    return f"{kind}-{'-'.join(task_label(t, unique=True) for t in plan.tasks)}"


def plan_trusts(plan: Plan) -> bool:
    """Whether this command line's config/overrides set model.trust_remote_code."""
    return bool((plan.base.get("model") or {}).get("trust_remote_code"))


def run_sweep(plan: Plan, study_name: str | None = None, storage: str | None = None,
              heartbeat: int = DEFAULT_HEARTBEAT, grace: int | None = None,
              max_retry: int = DEFAULT_MAX_RETRY, create_only: bool = False, quiet: bool = False,
              trust_remote_code: bool = False):  # fmt: skip
    """Create (or continue) the study of `plan` and run its points here until none is left.

    With `create_only`, only create it: workers (`loralab sweep worker`) run the points.
    Returns the worker's report, or None with `create_only`.
    """
    from .worker import Worker

    name = study_name or default_study_name(plan)
    st = open_storage(storage_url(storage, plan.results_dir), heartbeat, grace, max_retry)
    create_or_check(st, name, plan)
    if create_only:
        return None
    trust = trust_remote_code or plan_trusts(plan)  # this command line asked for it
    return Worker(st, name, None, plan.results_dir, heartbeat, quiet, trust).run()
