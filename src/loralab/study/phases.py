"""A study spec's phases: per task, the grid, the other seeds at the best lr, and one Optuna
study per ablation axis; each phase is an ordinary sweep plan (`grid.Plan`).

- `<name>-<task>-grid`: every method × its lr grid × the grid seeds (the first seed with
  `grid_on_first_seed`, every seed with `full_grid`);
- `<name>-<task>-seeds` (grid_on_first_seed): the other seeds at each method's best lr, made
  once the grid is complete;
- `<name>-<task>-ablate-<axis>`: LoRA at each value of the axis (any `lora.*` key: a variant
  is data), at the grid's best LoRA lr (made once the grid is complete), at an explicit lr, or
  at each lr of the axis's own grid (the report keeps each value's best, so a setting that
  shifts the effective step size, such as alpha, is not judged at a rate tuned for the base):
  every value × lr × seed with `full_grid`, the axis's first seed with `grid_on_first_seed`;
- `<name>-<task>-ablate-<axis>-seeds` (an axis grid on its first seed): the axis's other seeds,
  each value at its own best lr, made once the axis's grid is complete.

Dependent studies are deterministic functions of the stored grid results, so any worker may
create them and all of them create the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..config import from_dict, merge_dicts, to_dict
from .grid import Plan
from .records import points_per_unit, tie_inputs
from .stats import best_rate
from .storage import is_final
from .variants import variant_slug


@dataclass
class Ablation:
    """One axis: LoRA runs at each value of `key` (a lora.* key; or `lora`, whose values are
    variants: mappings of lora.* settings), all else as the base."""

    key: str
    values: list
    name: str
    scale_alpha: bool = False
    seeds: list[int] | None = None  # None = the task's first seed
    lr: list[float] | None = None  # None = the grid's best LoRA lr per task; 2+: a grid
    tasks: list[str] | None = None  # None = every task
    # With an lr grid: `full_grid` runs it on every seed, `grid_on_first_seed` on the first
    # (the others then run each value at its own best lr).
    lr_selection: str = "full_grid"

    @property
    def grid_on_first_seed(self) -> bool:
        return (
            self.lr is not None and len(self.lr) > 1 and self.lr_selection == "grid_on_first_seed"
        )


@dataclass
class StudySpec:
    """A validated study spec (read by `spec.load_spec`; examples in configs/studies/)."""

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
    task_lrs: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # a task's `lr:`
    task_seeds: dict[str, list[int]] = field(default_factory=dict)  # a task's `seeds:`

    def lrs_for(self, task: str) -> dict[str, list[float]]:
        """The task's lr grid per method: its own `lr:` lists where it has them, else the spec's."""
        return {m: self.task_lrs.get(task, {}).get(m, v) for m, v in self.lrs.items()}

    def first_lrs(self, task: str) -> dict[str, float]:
        """Each method's first lr for the task (a stand-in for the grid's best before it is known)."""
        return {m: v[0] for m, v in self.lrs_for(task).items()}

    def seeds_for(self, task: str) -> list[int]:
        """The task's seeds: its own `seeds:` where it has them (e.g. more for a noisy small
        dev set), else the spec's."""
        return list(self.task_seeds.get(task, self.seeds))

    def grid_seeds(self, task: str) -> list[int]:
        """The seeds the task's lr grid runs on: its first with grid_on_first_seed, else all."""
        seeds = self.seeds_for(task)
        return seeds[:1] if self.lr_selection == "grid_on_first_seed" else seeds


def lora_of(spec: StudySpec, task: str) -> dict:
    """The task's effective LoRA section (base <- per-task)."""
    data = merge_dicts(spec.base, spec.tasks[task])
    return to_dict(from_dict({"lora": data.get("lora", {})}).lora)


def ablation_variants(spec: StudySpec, task: str, abl: Ablation) -> list[dict]:
    """Each axis value as the diff of LoRA settings from the task's base (deduplicated)."""
    base = lora_of(spec, task)
    field_name = abl.key.split(".", 1)[1] if abl.key != "lora" else None
    out = []
    for v in abl.values:  # a value, or (axis `lora`) a whole variant: a mapping of settings
        lora = dict(base, **(v if field_name is None else {field_name: v}))
        if abl.scale_alpha:
            lora["alpha"] = float(base["alpha"]) * float(v) / base["r"]
        full = to_dict(from_dict({"lora": lora}).lora)  # normalised types (16 -> 16.0)
        diff = {k: full[k] for k in full if full[k] != base[k]}
        if diff not in out:
            out.append(diff)
    return out


def variant_name(diff: dict) -> str:
    """A variant's name in an axis's best-lr mapping: its key suffix ('a8', 'r4-a8'), or
    'base' for the task's own LoRA settings."""
    return variant_slug(diff).lstrip("-") or "base"


def axis_seeds(spec: StudySpec, task: str, abl: Ablation) -> list[int]:
    return list(abl.seeds or spec.seeds_for(task)[:1])


@dataclass
class Phase:
    """One Optuna study of the spec: a task's grid, its other seeds, one ablation, or an
    ablation's other seeds (`ablation-seeds`)."""

    task: str
    kind: str  # grid / seeds / ablation / ablation-seeds
    ablation: Ablation | None = None

    def study_name(self, prefix: str) -> str:
        tail = f"ablate-{self.ablation.name}" if self.ablation else self.kind
        return f"{prefix}-{self.task}-{tail}" + ("-seeds" if self.kind == "ablation-seeds" else "")

    @property
    def depends_on(self) -> Phase | None:
        """The phase whose results choose this one's learning rates (None: known from the start)."""
        if self.kind == "seeds" or (self.kind == "ablation" and self.ablation.lr is None):
            return Phase(self.task, "grid")
        if self.kind == "ablation-seeds":
            return Phase(self.task, "ablation", self.ablation)
        return None

    @property
    def chooses(self) -> bool:
        """Whether other phases wait on this one's choice of learning rates (`bests`)."""
        return self.kind == "grid" or (self.kind == "ablation" and self.ablation.grid_on_first_seed)

    @property
    def waits_on(self) -> str:
        """What a dependent phase waits for, in words."""
        if self.kind == "ablation-seeds":
            return "each setting's best lr on the axis's first seed"
        return "the grid's best lr"

    def bests(self, plan: Plan, values: dict[str, float | None], complete: bool = True) -> dict | None:  # fmt: skip
        """What this phase chooses for the phases that depend on it, from its points' values
        (`grid_values`): the task's grid, each method's best lr; an axis grid, each value's
        ({variant_name: lr}). None for a method or value that diverged at every rate: it is not
        run on its other seeds (nor, for LoRA, on the axes that take the grid's rate).
        `complete`: None until every point is final; else the best among the lrs whose points
        are all final so far."""
        if complete and any(v is None for v in values.values()):
            return None
        if self.kind == "grid":
            best = best_so_far(plan, values)
            if best is None or not complete:
                return best
            points = plan.points()
            return {m: None if _all_diverged([p for p in points if p["method"] == m], values) else lr
                    for m, lr in best.items()}  # fmt: skip
        out = {}
        for v in plan.variants:  # each value's points alone: its own best
            mine = replace(plan, variants=[v])
            best = best_so_far(mine, values)
            if best is None:
                return None
            lost = complete and _all_diverged(mine.points(), values)
            out[variant_name(v)] = None if lost else best["lora"]
        return out

    def plan(self, spec: StudySpec, best: dict | None = None, results_dir: str | None = None) -> Plan:  # fmt: skip
        """The phase's sweep plan; `best` = what its dependency chose (`bests`): the grid's best
        lr per method, or an axis grid's per value; without it, the first lr of each stands in
        (a dry run, a status while the choice is not made)."""
        # The spec's own keys, not every config default: a later loralab that adds a config key
        # must still recognise the stored study. The model is spelt out: the keys name it.
        model = from_dict(merge_dicts(spec.base, spec.tasks[self.task])).model
        base = merge_dicts(spec.base, {"model": {"name": model.name, "head": model.head}})
        variant_lrs = None
        if self.kind == "grid":
            methods, lrs, seeds, variants = (
                spec.methods,
                spec.lrs_for(self.task),
                spec.grid_seeds(self.task),
                [{}],
            )
            kind, abl_name = "sweep", None
        elif self.kind == "seeds":
            best = best or spec.first_lrs(self.task)
            methods, seeds, variants = spec.methods, spec.seeds_for(self.task)[1:], [{}]
            lrs = {m: [best[m]] for m in methods if best[m] is not None}
            kind, abl_name = "sweep", None
        else:
            a = self.ablation
            methods, seeds = ["lora"], axis_seeds(spec, self.task, a)
            variants = ablation_variants(spec, self.task, a)
            if self.kind == "ablation-seeds":  # each value at its own best, the other seeds
                best = best or {variant_name(v): a.lr[0] for v in variants}
                variant_lrs = [best[variant_name(v)] for v in variants]  # None: not run
                lrs, seeds = {"lora": sorted({x for x in variant_lrs if x is not None})}, seeds[1:]
            elif a.lr is not None:
                lrs = {"lora": list(a.lr)}
                seeds = seeds[:1] if a.grid_on_first_seed else seeds
            else:
                lr = (best or spec.first_lrs(self.task))["lora"]
                lrs = {"lora": [] if lr is None else [lr]}  # None: diverged at every rate
            kind, abl_name = "ablation", a.name
        return Plan(
            kind=kind, ablation=abl_name, tasks=[self.task], methods=list(methods), lrs=lrs,
            seeds=list(seeds), variants=variants, base=base,
            per_task={self.task: spec.tasks[self.task]},
            results_dir=str(results_dir or spec.output_dir), slugged=True, variant_lrs=variant_lrs,
        )  # fmt: skip


def _all_diverged(points: list[dict], values: dict[str, float | None]) -> bool:
    """Every one of `points` diverged (its value -inf, `grid_values`): no rate to run it at."""
    return all(values[p["key"]] == -math.inf for p in points)


def phases(spec: StudySpec, tasks: list[str] | None = None) -> list[Phase]:
    """Task by task: its grid, then its other seeds, then its ablations (each axis grid on its
    first seed followed by its other seeds). A worker takes the first phase with a point to
    run, so a long study completes whole tasks early (every seed, paired intervals) instead of
    every grid first; a phase that waits on a grid still being run elsewhere is skipped
    meanwhile, so no worker idles while there is work."""
    out = []
    for t in (t for t in spec.tasks if not tasks or t in tasks):
        out.append(Phase(t, "grid"))
        if spec.lr_selection == "grid_on_first_seed" and len(spec.seeds_for(t)) > 1:
            out.append(Phase(t, "seeds"))
        for a in spec.ablations:
            if not a.tasks or t in a.tasks:
                out.append(Phase(t, "ablation", a))
                if a.grid_on_first_seed and len(axis_seeds(spec, t, a)) > 1:
                    out.append(Phase(t, "ablation-seeds", a))
    return out


def best_lrs(study, plan: Plan) -> dict[str, float] | None:
    """Each method's lr with the best mean dev value over the grid seeds; None until every
    grid point is final. A diverged point counts as the worst value; ties go to the lower final
    dev loss where every tied lr recorded one, else to the smaller lr (as in the report's
    choice, whatever order the spec lists them in)."""
    return best_of(plan, grid_values(study, plan))


class Values(dict):
    """Point key -> dev value (`grid_values`); `losses`: point key -> the final dev loss its
    trial recorded (else its run folder's summary), where there is one: what breaks a tie on
    the value (`stats.best_rate`); `baselines`: point key -> the majority baseline's value on
    its dev set, where recorded: values within `UNINFORMATIVE_POINTS` of it tie where each
    has a loss (`stats.effective_scores`). Older rules, for studies stored under them: without baselines,
    only equal values tie (before 2026-12-06); a plain dict has no losses either, and ties go
    to the smaller lr (before 2026-12-05)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.losses: dict[str, float] = {}
        self.baselines: dict[str, float] = {}

    def without_baselines(self) -> Values:
        older = Values(self)
        older.losses = dict(self.losses)
        return older


def older_rules(values: dict) -> list[tuple[dict, str]]:
    """`values` as earlier rules for choosing rates saw them, newest first, each with what
    changed since: a study stored under one goes on at the rates it chose then."""
    if not isinstance(values, Values):
        return []
    return [
        (
            values.without_baselines(),
            "scores within a point of the majority baseline counted as tied",
        ),  # fmt: skip
        (dict(values), "ties on the main metric went to the lower dev loss"),  # no losses either
    ]


def grid_values(study, plan: Plan) -> Values:
    """Point key -> the dev value of its final trial (-inf: diverged or no value); None: not
    final (or no trial). Its `losses` hold the trials' final dev losses."""
    values = Values({p["key"]: None for p in plan.points()})
    for t in study.get_trials(deepcopy=False) if study is not None else []:
        key = t.user_attrs.get("point")
        if key in values and is_final(t):
            v = t.values[0] if t.values else None
            values[key] = v if v is not None and math.isfinite(v) else -math.inf
            result = t.user_attrs.get("result") or {}
            loss, base = tie_inputs(result, result.get("run_dir"))
            if loss is not None:
                values.losses[key] = loss
            if base is not None:
                values.baselines[key] = base
    return values


def best_of(plan: Plan, values: dict[str, float | None]) -> dict[str, float] | None:
    """`best_lrs` from point values (`grid_values`); None while any of them is None."""
    if any(v is None for v in values.values()):
        return None
    return best_so_far(plan, values)


def best_so_far(plan: Plan, values: dict[str, float | None]) -> dict[str, float] | None:
    """Each method's best lr among the lrs whose grid points are all final (`best_of` once
    the grid is complete); None while some method has no such lr."""
    best, losses = {}, getattr(values, "losses", {})
    recorded = getattr(values, "baselines", {})
    bases = [recorded[p["key"]] for p in plan.points() if p["key"] in recorded]
    baseline = sum(bases) / len(bases) if bases else math.nan  # one task, one dev set
    per_unit = points_per_unit(plan.tasks[0]) if len(plan.tasks) == 1 else math.nan
    for m in plan.methods:
        scores = []
        for lr in plan.lrs[m]:
            keys = [p["key"] for p in plan.points() if p["method"] == m and p["lr"] == lr]
            vals = [values[k] for k in keys]
            if None not in vals:
                loss = [losses.get(k) for k in keys]
                mean_loss = None if None in loss else sum(loss) / len(loss)
                scores.append((sum(vals) / len(vals), lr, mean_loss))
        if not scores:
            return None
        best[m] = best_rate(scores, baseline, per_unit)[0]  # ties: the lower loss, else smaller lr
    return best
