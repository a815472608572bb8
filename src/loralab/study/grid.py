"""Sweep and ablation plans: the grid of points and the training config of each.

A study is a fixed grid of points (task × method × learning rate × seed × LoRA variant). Every
point is one ordinary `train` run with a deterministic run directory, RESULTS/runs/<point key>.
A LoRA variant is data: the `lora.*` settings a point sets (`point["lora"]`, {} for full
fine-tuning). The plan is stored in the study (`storage.py`), so a worker on another machine
needs only the study name and the storage URL.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config import (
    LORA_PRESETS,
    ExperimentConfig,
    ModelConfig,
    build_config,
    from_dict,
    merge_dicts,
    parse_overrides,
    to_dict,
    validate,
)
from ..errors import LoralabError
from ..heads import check_config
from ..rundir import RUNS_DIR
from ..tasks import absolute_ref, get_task, task_label
from .prechecks import check_points
from .variants import LORA_DEFAULTS, legacy_suffix, slug, variant_slug

DEFAULT_LR = {"lora": [1e-4, 3e-4], "full": [1e-5, 3e-5]}
DEFAULT_SEEDS = [42, 1337, 2024]
ABLATIONS = ("rank", "alpha", "modules", "all")
RANKS = (4, 8, 16)  # alpha = 2·r in the rank ablation
ALPHAS = (8.0, 16.0, 32.0)  # at r = 8
PLAN_VERSION = 1  # in every plan's fingerprint
# Stored by a plan with per-value rates (`variant_lrs`): a loralab that predates them refuses
# it rather than drop them and train every value at every rate.
PER_VALUE_LRS = 2
DEFAULT_HEAD = ModelConfig().head  # the head a run key leaves unnamed
PATH_KEYS = ("data_dir", "train_file", "eval_file")  # the data.* keys that name local paths


@dataclass
class Plan:
    """Everything a worker needs to run any point of a study."""

    kind: str  # "sweep" or "ablation"
    ablation: str | None
    tasks: list[str]
    methods: list[str]
    lrs: dict[str, list[float]]
    seeds: list[int]
    variants: list[dict]  # lora.* settings per variant; a sweep has one
    base: dict  # ExperimentConfig as a dict, without the `run` section
    per_task: dict = field(default_factory=dict)  # task -> partial config mapping
    results_dir: str = "results"
    # Variants as any lora.* settings (the diff from the base), named by `variant_slug` in the
    # keys; else {r, alpha, target}, named by `legacy_suffix` (the keys of `loralab sweep`), then
    # with `names_settings` the other non-default settings of the task's LoRA section.
    slugged: bool = False
    # Legacy keys also name the LoRA settings beyond r, alpha and target (`-dora`): plans made by
    # `make_plan` since then; a stored plan from before keeps its keys (False).
    names_settings: bool = False
    # Per variant, the one lr it runs at (an axis's other seeds, each value at its own best;
    # None for a value not run); None: every variant at every lr of `lrs`.
    variant_lrs: list[float] | None = None

    @property
    def group(self) -> str:
        """The report section this study's runs belong to."""
        return "sweep" if self.kind == "sweep" else f"ablation-{self.ablation}"

    def points(self) -> list[dict]:
        """The grid, seed-major, so that a stopped sweep already has whole seeds."""
        out = []
        for task in self.tasks:
            # The task's LoRA settings (base <- per task) name a legacy key's extra settings.
            named = merge_dicts(self.base.get("lora") or {}, self.per_task.get(task, {}).get("lora") or {}) if self.names_settings else None  # fmt: skip
            for seed in self.seeds:
                for method in self.methods:
                    for lr in self.lrs.get(method, []):
                        for i, v in enumerate(self.variants if method == "lora" else [{}]):
                            if method == "lora" and self.variant_lrs and self.variant_lrs[i] != lr:
                                continue
                            p = {"task": task, "method": method, "lr": lr, "seed": seed,
                                 "lora": dict(v)}  # fmt: skip
                            p["key"] = point_key(p, self.base, self.slugged, named)
                            out.append(p)
        return out

    def fingerprint(self) -> str:
        """Identifies the grid and the settings of every run (not the results folder); the same
        points listed in another order (a spec's rates or methods reordered) are the same grid."""
        data = {
            "v": PLAN_VERSION,
            "points": sorted(self.points(), key=lambda p: p["key"]),
            "base": self.base,
            "per_task": self.per_task,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        version = PER_VALUE_LRS if self.variant_lrs else PLAN_VERSION
        return {"version": version, **asdict(self), "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        if data.get("version") not in (PLAN_VERSION, PER_VALUE_LRS):
            raise LoralabError(
                f"The study was made by another loralab version (plan version {data.get('version')}, "
                f"this one reads {PLAN_VERSION} and {PER_VALUE_LRS}): run it with that version."
            )
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_absolute_paths(self) -> Plan:
        """This plan with its data paths and results folder resolved against the current folder:
        a worker started anywhere else (`loralab sweep worker`) then finds them."""
        return replace(
            self,
            base=_absolute_data(self.base),
            per_task={t: _absolute_data(v) for t, v in self.per_task.items()},
            results_dir=str(Path(self.results_dir).expanduser().resolve()),
        )

    def config_for(self, point: dict, results_dir: str | Path | None = None) -> ExperimentConfig:
        """The full training config of one point, its run directory RESULTS/runs/<key>."""
        data = merge_dicts(self.base, self.per_task.get(point["task"], {}))
        fixed = {
            "data": {"task": point["task"]},
            "train": {"method": point["method"], "lr": point["lr"], "seed": point["seed"]},
            "run": {"output_dir": str(Path(results_dir or self.results_dir) / RUNS_DIR),
                    "name": point["key"]},
        }  # fmt: skip
        if point["lora"]:
            fixed["lora"] = point["lora"]
        return from_dict(merge_dicts(data, fixed))


def _absolute_data(section: dict) -> dict:
    """A config mapping with its data.* paths (`PATH_KEYS`) made absolute."""
    data = section.get("data")
    if not isinstance(data, dict):
        return section
    fixed = {k: str(Path(v).expanduser().resolve()) if k in PATH_KEYS and isinstance(v, str) and v
             else v for k, v in data.items()}  # fmt: skip
    return {**section, "data": fixed}


def point_key(point: dict, base: dict, slugged: bool = True, named: dict | None = None) -> str:
    """Deterministic run-directory name, e.g. sst2-lora-smollm2-135m-lr0.0003-s42-r8-a16-standard
    (`slugged`: the variant named by `variant_slug`; else by `legacy_suffix`, followed, when
    `named` holds the run's LoRA section, by the `variant_slug` of its settings beyond r, alpha
    and target that differ from the defaults, e.g. `-dora`)."""
    model = slug(Path(base["model"]["name"]).name or base["model"]["name"])
    head = base["model"].get("head", DEFAULT_HEAD)
    head = "" if head == DEFAULT_HEAD else f"-{slug(head)}"  # e.g. "-lm"
    task = task_label(point["task"], unique=True)  # a custom task is a path: keep its name
    key = f"{task}-{point['method']}-{model}{head}-lr{point['lr']:g}-s{point['seed']}"
    if slugged:
        return key + variant_slug(point["lora"])
    if point["method"] != "lora":
        return key
    if named is None:
        return key + legacy_suffix(point["lora"])
    # Settings beyond r, alpha and target (a DoRA sweep, another dropout) name themselves too,
    # so such a sweep and the plain one can share a results folder; plain keys stay as they were.
    lora = {**named, **point["lora"]}
    other = {k: v for k, v in lora.items() if k in LORA_DEFAULTS and k != "target" and v != LORA_DEFAULTS[k]}  # fmt: skip
    return key + legacy_suffix(point["lora"]) + variant_slug(other)


def ablation_variants(kind: str, base_lora: dict) -> list[dict]:
    """LoRA settings of an ablation: rank (alpha = 2r), alpha (r = 8), module preset, or all."""
    target = base_lora["target"]
    if kind == "rank":
        return [{"r": r, "alpha": 2.0 * r, "target": target} for r in RANKS]
    if kind == "alpha":
        return [{"r": 8, "alpha": a, "target": target} for a in ALPHAS]
    if kind == "modules":
        return [
            {"r": base_lora["r"], "alpha": float(base_lora["alpha"]), "target": p}
            for p in LORA_PRESETS
        ]
    if kind == "all":
        return [
            {"r": r, "alpha": a, "target": p} for r in RANKS for a in ALPHAS for p in LORA_PRESETS
        ]
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
            value = kind(item)
        except ValueError:
            word = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise LoralabError(f"{name}: '{item}' is not {word}.") from None
        if kind is float and not (math.isfinite(value) and value > 0):  # the learning rates
            raise LoralabError(f"{name}: '{item}' is not a positive learning rate, e.g. 3e-4.")
        out.append(value)
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
        if key == "train.method" and kind == "ablation":
            raise LoralabError(
                "train.method is set by the ablation: it varies LoRA settings, so every point is "
                "LoRA. Compare with full fine-tuning in a sweep (`loralab sweep --methods lora,full`)."
            )
        if key in grid_keys:
            raise LoralabError(f"{key} is set per point by the grid: use {grid_keys[key]} instead.")
    check_honoured(kind, ablation, glob, [f"{t}:{x}" for t, v in per_task_items.items() for x in v])
    base_cfg = build_config(config, glob, **sections)
    if base_cfg.train.lr is not None and lora_lr is None and full_lr is None:
        raise LoralabError(
            f"The --config file sets train.lr={base_cfg.train.lr:g}, which a {kind} does not use: "
            "each point's learning rate comes from --lora-lr/--full-lr. Pass "
            f"--lora-lr {base_cfg.train.lr:g} (or --full-lr), or remove train.lr from the file."
        )
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
    keys = [x.split("=", 1)[0].split(":")[-1].strip() for x in overrides or []]  # task: prefix off
    lora_keys = [k for k in keys if k.startswith("lora.")]
    if lora_keys and "lora" not in method_list:
        raise LoralabError(
            f"{', '.join(lora_keys)} given, but --methods is {','.join(method_list)}: full "
            "fine-tuning builds no adapter, so lora.* settings would be ignored. Drop them, or "
            "add lora to --methods."
        )
    unused = [f"--{m}-lr" for m, v in lrs.items() if v is not None and m not in method_list]
    if unused:
        raise LoralabError(f"{', '.join(unused)} given, but --methods is {','.join(method_list)}: add the method or drop the rates.")  # fmt: skip
    lrs = {m: DEFAULT_LR[m] if v is None else v for m, v in lrs.items() if m in method_list}
    seed_list = parse_list(seeds, int, "--seeds")
    base = to_dict(base_cfg)
    base.pop("run")
    plan = Plan(
        kind=kind, ablation=ablation, tasks=task_list, methods=method_list, lrs=lrs,
        seeds=DEFAULT_SEEDS if seed_list is None else seed_list, variants=variants, base=base,
        per_task={t: parse_overrides(v) for t, v in per_task_items.items()},
        results_dir=str(results_dir), names_settings=True,
    ).with_absolute_paths()  # fmt: skip
    points = plan.points()
    if not points or not all(plan.lrs.get(m) for m in plan.methods):
        empty = [n for n, v in (("tasks (--tasks)", plan.tasks), ("methods (--methods)", plan.methods),
                 ("seeds (--seeds)", plan.seeds)) if not v]  # fmt: skip
        empty += [f"{m} learning rates (--{m}-lr)" for m in plan.methods if not plan.lrs.get(m)]
        raise LoralabError(
            f"The grid is empty: no {' and no '.join(empty) or 'points'}. Give at least one value "
            "of each (defaults: tasks from the config, methods lora,full, seeds 42,1337,2024)."
        )
    keys = [p["key"] for p in points]
    if len(set(keys)) != len(keys):
        raise LoralabError(
            "The grid repeats a point (a task, learning rate or seed given twice): give each once."
        )
    cfgs = [plan.config_for(p) for p in points]
    check_points(cfgs)  # model typos and targets fail here, before the study is created
    for cfg in cfgs:  # fail now, not on some machine hours later
        validate(cfg)
        check_config(cfg)
        for key in PATH_KEYS:
            path = getattr(cfg.data, key)
            if path and not Path(path).expanduser().exists():
                raise LoralabError(
                    f"data.{key} (--{key.replace('_', '-')}) is '{path}', which does not exist. "
                    "Give the folder or file that holds the task's data; nothing was created."
                )
    return plan


def default_study_name(plan: Plan) -> str:
    kind = "sweep" if plan.kind == "sweep" else f"ablate-{plan.ablation}"
    return f"{kind}-{'-'.join(task_label(t, unique=True) for t in plan.tasks)}"


def plan_trusts(plan: Plan) -> bool:
    """Whether this command line's config/overrides set model.trust_remote_code."""
    return bool((plan.base.get("model") or {}).get("trust_remote_code"))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def memory_key(cfg) -> str:
    """What a point's peak depends on, hashed: its whole config (an `ExperimentConfig`) but the
    learning rate, the seed and where it writes, in which a study's points of one setting
    differ; data paths as given (another copy of the data is another key, a safe miss)."""
    d = to_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("lr", "seed")}
    d = {k: v for k, v in d.items() if k not in ("run", "tracking")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:24]
