"""The report's tables: the main LoRA-vs-full table, every metric per task, the learning-rate
grid, one table per ablation, and the rows of report.csv."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from .aggregate import (
    DROP_TARGET_POINTS,
    SETTLE_MOST,
    SHARE_TARGET_PCT,
    Cell,
    Comparison,
    ablation_base,
    families,
    full_reference,
    is_ablation,
    paired_diffs,
)
from .records import final_loss, points_per_unit
from .stats import UNINFORMATIVE_POINTS, mean_std, seeds_to_settle, t_interval
from .variants import is_number


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def _pm(cell: Cell, metric: str) -> str:
    mean, std = cell.stat(metric)
    if math.isnan(mean):
        return "—"
    k = points_per_unit(cell.task)
    return f"{k * mean:.2f}" + (f" ± {k * std:.2f}" if not math.isnan(std) else " (1 seed)")


def _f(x: float, fmt: str = ".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _points(cell: Cell, value: float) -> str:
    return _f(points_per_unit(cell.task) * value, ".2f")


def _loss(cell: Cell) -> str:
    """The final dev loss, mean ± std over the seeds that recorded it ('—' for none): the one
    figure that still tells runs apart when every one of them sits at the majority baseline."""
    vals = [x for r in cell.done if (x := final_loss(r)) is not None]
    if not vals:
        return "—"
    mean, std = mean_std(vals)
    spread = f" ± {std:.3f}" if len(vals) > 1 else ""
    n = len(vals)
    seeds = f" ({n} seed{'s' * (n > 1)})" if n == 1 or n < len(cell.scored) else ""
    return f"{mean:.3f}{spread}{seeds}"


def _share_verdict(ok: bool | None, share: float) -> str:
    return "n/a" if ok is None else f"{'PASS' if ok else 'FAIL'}: {share:.3f}%"


def _diverged(cell: Cell) -> int:
    return sum(r["status"] == "diverged" for r in cell.runs)


def _n(cell: Cell) -> str:
    """'3 (+1 diverged)': the seeds the main metric's mean stands on, and the others."""
    return f"{len(cell.scored)}" + "".join(f" (+{n} {why})" for why, n in _unscored(cell) if n)


def _unscored(cell: Cell) -> list[tuple[str, int]]:
    """Runs outside the mean: diverged, and completed without the main metric."""
    missing = len(cell.done) - len(cell.scored)
    return [("diverged", _diverged(cell)), (f"without {cell.metric}", missing)]


def _per_seed(comp: Comparison | None) -> str:
    if comp is None or not comp.pairs:
        return ""
    return ", ".join(f"{s}: {d:+.2f}" for (s, _, _), d in zip(comp.pairs, comp.diffs, strict=True))


MAIN_HEADERS = ["task", "head", "model", "method", "LoRA", "data", "schedule", "best lr", "seeds",
                "main metric (mean ± std)", "majority baseline", "zero-shot",
                "LoRA − full per seed (points)", f"LoRA − full ≥ −{DROP_TARGET_POINTS:g} (mean [95% CI])",
                "trainable % (without head)", f"trainable ≤ {SHARE_TARGET_PCT:g}%",
                "wall time (s)", "training CPU (s)", "peak memory (MB)"]  # fmt: skip


# The main table's columns that the console shows (the files have them all).
CONSOLE_COLUMNS = ("task", "head", "model", "method", "LoRA", "data", "schedule", "best lr",
                   "seeds", "main metric (mean ± std)", "majority baseline", "zero-shot",
                   MAIN_HEADERS[13], MAIN_HEADERS[15])  # fmt: skip


def main_table(cells: list[Cell], comps: list[Comparison]) -> Table:
    """One row per identity (at its best learning rate) outside the ablations."""
    by_lora = {id(c.lora): c for c in comps}
    rows = []
    for cell in (c for c in cells if c.best and not is_ablation(c.group)):
        comp = by_lora.get(id(cell))
        share = cell.avg("trainable_share_without_head_pct")
        rows.append([
            cell.task, cell.head, cell.model, cell.method, cell.variant, cell.data, cell.schedule,
            f"{cell.lr:g}", _n(cell), f"{cell.metric}: {_pm(cell, cell.metric)}",
            _points(cell, cell.reference("majority")), _points(cell, cell.reference("zero_shot")),
            _per_seed(comp), comp.verdict if comp else "",
            _f(share, ".3f"), _share_verdict(comp.share_ok, share) if comp else "",
            _f(cell.avg("wall_time_s")), _f(cell.avg("train_cpu_time_s"), ".0f"),
            _f(cell.avg("peak_memory_mb"), ".0f"),
        ])  # fmt: skip
    return Table(
        "LoRA vs full fine-tuning (one row per run identity, best learning rate each)",
        MAIN_HEADERS,
        rows,
        "Metrics in points (GLUE: % of examples; SQuAD v2: official %), mean ± sample std over "
        "seeds. head: classifier is a sequence-classification head (GLUE) or span extraction "
        "(SQuAD v2), lm the prompted language model. data: fingerprint of the train/eval rows "
        "and the caps (an eval cap takes examples spread over the dev set; '(first)': its first "
        "ones, as runs did before 2026-12-05). Majority baseline: the "
        "dev-set score of always giving the most frequent answer. LoRA − full: paired by seed; "
        f"mean and 95% Student-t interval over seeds. Targets: LoRA loses at most "
        f"{DROP_TARGET_POINTS:g} points to full fine-tuning (a row where neither method is more than "
        f"{UNINFORMATIVE_POINTS:g} point above the majority baseline is uninformative, not a "
        f"pass; unsettled: the interval reaches both sides of -{DROP_TARGET_POINTS:g}, so more "
        "seeds could flip the verdict of the mean; the seeds that would settle it are projected "
        "at the same mean and spread of the paired differences), "
        f"with at most {SHARE_TARGET_PCT:g}% of the weights trainable (adapters only, without "
        "the freshly initialised task head; a target for the standard preset, n/a for "
        "others). Wall time counts whatever the machine did meanwhile "
        "(other work, pauses, idle cores lent to the run: lent_share in runs.csv); training CPU "
        "time is the training's own, over all its threads "
        "(— for runs from before it was recorded).",
    )


def _at(cell: Cell | None) -> str:
    """'86.39 ± 0.35 (lr 0.001, 3 seeds)'"""
    if cell is None:
        return "—"
    mean, std = cell.stat(cell.metric)
    k, n = points_per_unit(cell.task), len(cell.scored)
    value = f"{k * mean:.2f}" + ("" if math.isnan(std) else f" ± {k * std:.2f}")
    others = "".join(f", +{m} {why}" for why, m in _unscored(cell) if m)
    return f"{value} (lr {cell.lr:g}, {n} seed{'s' * (n != 1)}{others})"


def _both(comp: Comparison, key: str, scale: float = 1.0, fmt: str = ".0f") -> str:
    """'7.0 / 10.2 (0.69×)': LoRA's and full fine-tuning's mean of `key` (x scale), and their
    ratio; a dash for a side that has no value. Where one side lacks the value on some seeds
    (runs from before it was recorded), the ratio is over the seeds both have, and says so:
    each side's mean over its own runs would compare different seeds and code versions."""
    lora = comp.lora.avg(key) * scale
    full = comp.full.avg(key) * scale if comp.full else math.nan
    text = f"{_f(lora, fmt)} / {_f(full, fmt)}"
    if not full or math.isnan(lora + full):
        return text
    sides = [{r.get("seed"): r[key] for r in c.done if is_number(r.get(key))} for c in (comp.lora, comp.full)]  # fmt: skip
    if all(len(side) == len(c.done) for side, c in zip(sides, (comp.lora, comp.full), strict=True)):
        return text + f" ({lora / full:.2f}×)"
    shared = sorted(set(sides[0]) & set(sides[1]), key=str)
    if not shared or not sum(sides[1][s] for s in shared):
        return text + " (no seed has both)"
    ratio = sum(sides[0][s] for s in shared) / sum(sides[1][s] for s in shared)
    return text + f" ({ratio:.2f}× on the {len(shared)} seed{'s' * (len(shared) != 1)} both have)"


def _held_out(comp: Comparison) -> str:
    """'-1.90 [-5.52, +1.72] (seeds 1337, 2024)': LoRA − full on the seeds that chose neither
    learning rate; a dash when every paired seed took part in the choice."""
    diffs = comp.held_out_diffs
    if not diffs:
        return "—"
    mean, lo, hi = t_interval(diffs)
    seeds = ", ".join(str(s) for s, _, _ in comp.pairs if s not in comp.picked_seeds)
    ci = f" [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else ""
    return f"{mean:+.2f}{ci} (seed{'s' * (len(diffs) > 1)} {seeds})"


GLANCE_TITLE = "At a glance: LoRA vs full fine-tuning per task"


def glance_table(comps: list[Comparison]) -> Table:
    """One row per task and model: the two methods at their best lr and the paired verdict.
    Where a task and model have several LoRA settings (variants, a quantized base), each row's
    LoRA cell names its setting, as the main table's LoRA column does."""
    seen = Counter((c.task, c.model, c.head) for c in comps)

    def lora(c: Comparison) -> str:
        at = _at(c.lora)
        return f"{c.lora.variant}: {at}" if seen[(c.task, c.model, c.head)] > 1 else at

    rows = [[c.task, c.model, c.head, c.lora.metric, _points(c.lora, c.lora.reference("majority")),
             lora(c), _at(c.full), c.verdict, _held_out(c),
             _f(c.lora.avg("trainable_share_without_head_pct"), ".3f"),
             _both(c, "train_cpu_time_s", 1 / 60, ".1f"), _both(c, "wall_time_s", 1 / 60, ".1f"),
             _both(c, "peak_memory_mb")] for c in comps]  # fmt: skip
    return Table(
        GLANCE_TITLE,
        ["task", "model", "head", "metric", "majority baseline", "LoRA", "full fine-tuning",
         "LoRA − full (mean [95% CI])", "LoRA − full, seeds that did not pick the lr",
         "trainable % (without head)",
         "training CPU (min), LoRA / full", "wall time (min), LoRA / full",
         "peak memory (MB), LoRA / full"],
        rows,
        "Each method at its best learning rate (mean ± std over seeds, in points); LoRA − full "
        "paired by seed. On the seeds whose scores picked a method's learning rate, its score is "
        "the best of its grid, which flatters it (the more, the larger its grid); the next column "
        "pairs only the other seeds (mean [95% CI], no interval for one seed). Time and memory: "
        "means per run, LoRA / full fine-tuning (their ratio; over the seeds both recorded, where "
        "older runs lack the figure on one side). The next table has every column.",
    )  # fmt: skip


def _minus_base(cell: Cell, base: Cell | None) -> str:
    """'+0.35 [-1.20, +1.90] (3 seeds)': `cell` − the axis's base, paired by seed; 'base' on
    the base's own row, a dash when the axis has no base or no seed in common."""
    if base is None or base is cell:
        return "—" if base is None else "base"
    return _minus(cell, base)


def _minus(cell: Cell, other: Cell | None) -> str:
    """`cell` − `other` paired by seed, as `_minus_base` writes it; a dash without a seed in
    common."""
    diffs = paired_diffs(cell, other) if other is not None else []
    if not diffs:
        return "—"
    mean, lo, hi = t_interval(diffs)
    ci = f" [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else ""
    apart = _to_tell_apart(diffs)
    more = f"; {'~' * isinstance(apart, int)}{apart} to tell apart" if apart else ""
    return f"{mean:+.2f}{ci} ({len(diffs)} seed{'s' * (len(diffs) > 1)}{more})"


def _to_tell_apart(diffs: list[float]) -> int | str:
    """Where the paired interval spans 0: the seeds whose interval would exclude it at the
    same mean and spread ('>50' past the projection's reach); '' where it already does."""
    _, lo, hi = t_interval(diffs)
    if math.isnan(lo) or not lo < 0 < hi:
        return ""
    reach = max(SETTLE_MOST, len(diffs))
    return seeds_to_settle(diffs, 0.0, most=reach) or f">{reach}"


def tables(cells: list[Cell], comps: list[Comparison]) -> list[Table]:
    out = [main_table(cells, comps), glance_table(comps)]
    best = [c for c in cells if c.best]
    for task in sorted({c.task for c in best}):
        group = [c for c in best if c.task == task]
        metrics = sorted(
            {m for c in group for m in c.metrics}, key=lambda m: (m != group[0].metric, m)
        )
        # Dev loss only where some run recorded it (summaries before 2026-12-05 lack it).
        loss = any(_loss(c) != "—" for c in group)
        out.append(Table(
            f"{task}: every metric at the best learning rate",
            ["group", "head", "model", "method", "LoRA", "data", "lr", "seeds", *metrics,
             *(["dev loss"] if loss else [])],
            [[c.group, c.head, c.model, c.method, c.variant, c.data, f"{c.lr:g}", _n(c),
              *[_pm(c, m) for m in metrics], *([_loss(c)] if loss else [])] for c in group],
            "Dev loss: the final evaluation's, mean ± std over the seeds that recorded it (the "
            "head's own loss on the dev set; older runs lack it). Where every run sits at the "
            "majority baseline, it still shows which method has begun to learn."
            if loss else "",
        ))  # fmt: skip
    out.append(Table(
        "Learning-rate grid (main metric)",
        ["group", "task", "head", "model", "method", "LoRA", "data", "lr", "seeds", "main metric", "best"],
        [[c.group, c.task, c.head, c.model, c.method, c.variant, c.data, f"{c.lr:g}", _n(c),
          _pm(c, c.metric), ("✓ (tie: lower dev loss)" if c.chosen_by_loss else "✓") if c.best else ""]
         for c in cells],
        "group: `sweep` for the learning-rate grid and the seeds run at its best rates, "
        "`ablation-<axis>` for an ablation's runs. A best rate tied with another on the main "
        "metric is chosen by the lower final dev loss where every tied rate recorded one.",
    ))  # fmt: skip
    for group in sorted({c.group for c in best if is_ablation(c.group)}):
        # An axis with its own lr grid picks each setting's rate; one without keeps the base's
        # (per setting: the tasks of one axis have their own base rates).
        own_lr = any(len(fam) > 1 for fam in families([c for c in cells if c.group == group]))
        # Chosen on the first seed alone (`grid_on_first_seed`): the other seeds are free of it.
        on_first = any(c.chose_lr_on and c.chose_lr_on != {r["seed"] for r in c.done} for c in best if c.group == group)  # fmt: skip
        rows = []
        settings = [c for c in best if c.group == group and c.lora]
        # One rate given by the axis (`lr: 3.0e-3`) rather than the grid's best for the base.
        grid_lr = {c.counterpart[1]: c.lr for c in best if c.lora and not is_ablation(c.group)}
        kept = all(grid_lr.get(c.counterpart[1]) == c.lr for c in settings)
        loss = any(_loss(c) != "—" for c in settings)  # as in the per-task tables
        for c in settings:
            ref = full_reference(c, cells)
            rows.append([c.task, c.head, c.model, c.variant, c.data, f"{c.lr:g}", _n(c),
                         f"{c.metric}: {_pm(c, c.metric)}", *([_loss(c)] if loss else []),
                         _minus_base(c, ablation_base(c, cells)),
                         _pm(ref, ref.metric) if ref else "—", _minus(c, ref),
                         _f(c.avg("trainable_share_without_head_pct"), ".3f"),
                         _f(c.avg("wall_time_s")), _f(c.avg("train_cpu_time_s"), ".0f"),
                         _f(c.avg("peak_memory_mb"), ".0f")])  # fmt: skip
        out.append(Table(
            f"Ablation: {group.removeprefix('ablation-')} (best learning rate per setting)",
            ["task", "head", "model", "LoRA", "data", "best lr", "seeds", "main metric",
             *(["dev loss"] if loss else []),
             "− base, paired by seed (mean [95% CI])", "full fine-tuning",
             "− full, paired by seed (mean [95% CI])",
             "trainable % (without head)", "wall time (s)", "training CPU (s)",
             "peak memory (MB)"],
            rows,
            "− base: this setting's main metric minus the axis's base setting (the study's own "
            "LoRA settings, the grid's runs reused) on the seeds both ran, in points; mean and "
            "95% Student-t interval over those seeds. An interval that spans 0 does not tell "
            "the two settings apart at these seeds; the seeds that would are projected at the "
            "same mean and spread of the differences (a plug-in estimate; "
            f"'>{SETTLE_MOST}': the two are as good as tied). Full fine-tuning: its best learning rate, "
            "all its seeds; − full: this setting minus it on the seeds both ran, likewise. "
            + ("Dev loss: the final evaluation's, as in the per-task tables. " if loss else "")
            + (
                "Best lr: each setting's own, from the axis's lr grid, chosen on the seeds "
                + (
                    "every rate ran (`lr_chosen_on_seeds` in report.csv); its scores on the "
                    "other seeds are free of that choice."
                    if on_first
                    else "every rate ran, which are also the seeds it is scored on (optimistic "
                    "alike for every setting, the base included)."
                )
                if own_lr
                else "Best lr: the ablation keeps LoRA's, tuned for the base."
                if kept
                else "Best lr: the one rate the axis gives (its `lr:`), not the grid's best for "
                "the study's own LoRA settings."
            ),
        ))  # fmt: skip
    return out


def _to_settle(comp: Comparison | None) -> int | str:
    """report.csv's seeds_to_settle: the projected count, '>N' past the projection's reach,
    '' where nothing is unsettled."""
    if comp is None or not comp.unsettled:
        return ""
    return comp.seeds_to_settle or f">{comp.settle_reach}"


def _paired_columns(name: str, cell: Cell, other: Cell | None) -> dict:
    """report.csv's NAME_points, _ci95_low, _ci95_high and _seeds_to_tell_apart: `cell` −
    `other` paired by seed ('' without `other` or a seed in common)."""
    diffs = paired_diffs(cell, other) if other is not None else []
    mean, lo, hi = t_interval(diffs) if diffs else ("", "", "")
    return {f"{name}_points": mean, f"{name}_ci95_low": lo, f"{name}_ci95_high": hi,
            f"{name}_seeds_to_tell_apart": _to_tell_apart(diffs) if diffs else ""}  # fmt: skip


def csv_rows(cells: list[Cell], comps: list[Comparison]) -> list[dict]:
    """One row per cell, raw units (GLUE metrics as fractions); LoRA rows carry the deltas."""
    by_lora = {id(c.lora): c for c in comps}
    metrics = sorted({m for c in cells for m in c.metrics})
    rows = []
    for c in cells:
        comp = by_lora.get(id(c))
        lora = c.lora or {}
        target = lora.get("target", "")
        row = {"group": c.group, "identity": c.identity_id, "task": c.task, "model": c.model,
               "head": c.head, "method": c.method, "lora": c.variant if c.lora else "",
               "r": lora.get("r", ""), "alpha": lora.get("alpha", ""),
               "target": "+".join(target) if isinstance(target, list) else target,
               "data": c.data, "schedule": c.schedule, "lr": c.lr, "best_lr": c.best,
               "n": len(c.scored), "n_diverged": _diverged(c),
               "seeds": " ".join(str(r["seed"]) for r in c.scored), "main_metric": c.metric,
               "majority_baseline": c.reference("majority"), "zero_shot": c.reference("zero_shot")}  # fmt: skip
        for m in metrics:
            mean, std = c.stat(m)
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        for k in ("trainable_share_pct", "trainable_share_without_head_pct", "wall_time_s",
                  "train_cpu_time_s", "peak_memory_mb", "eval_loss"):  # fmt: skip
            row[k] = c.avg(k)
        row["lr_chosen_on_seeds"] = " ".join(str(s) for s in sorted(c.chose_lr_on, key=str))
        base = ablation_base(c, cells) if is_ablation(c.group) and c.best else None
        row.update(_paired_columns("minus_base", c, base if base is not c else None))
        ref = full_reference(c, cells) if is_ablation(c.group) and c.best and c.lora else None
        row.update(_paired_columns("minus_full", c, ref))
        mean, lo, hi = comp.interval if comp else ("", "", "")
        held = comp.held_out_diffs if comp else []
        row.update(lora_minus_full_points=mean, ci95_low=lo, ci95_high=hi,
                   paired_seeds=" ".join(str(s) for s, _, _ in comp.pairs) if comp else "",
                   held_out_minus_full_points=t_interval(held)[0] if held else "",
                   held_out_n=len(held) if comp else "",
                   uninformative=comp.uninformative if comp else "",
                   drop_target_pass="" if comp is None or comp.uninformative else comp.drop_ok,
                   unsettled="" if comp is None or comp.unsettled is None else comp.unsettled,
                   seeds_to_settle=_to_settle(comp),
                   share_target_pass=comp.share_ok if comp else "")  # fmt: skip
        rows.append(row)
    return rows
