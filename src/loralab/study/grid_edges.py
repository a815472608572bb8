"""The report's warnings about learning-rate grids: a best rate at the edge of its grid (the
optimum may lie beyond it), and a grid whose rates all scored the same."""

from __future__ import annotations

import math

from .aggregate import Cell, families, is_ablation
from .choice import selection_rows
from .records import points_per_unit
from .stats import UNINFORMATIVE_POINTS, effective_scores


def grid_edge_warnings(cells: list[Cell], pending: dict | None = None) -> list[str]:
    """One warning per chosen learning rate that is the highest or lowest of its grid (2+ values)
    and beats every other rate of it: the optimum may lie beyond it, so that method may be
    under-tuned against the other. A best tied by another rate lies on a plateau that reaches
    into the grid: no warning; a grid where every rate scored the same gets its own (e.g. every
    run at the majority baseline: the dev loss chose, or nothing did).

    `pending`: (task, method) -> learning rates a stored study still has to run. A grid with one
    of them missing is not complete yet (its edge may move): no warning for it until it is."""
    out = []
    for fam in families(cells):
        lrs = sorted({c.lr for c in fam})
        best = next((c for c in fam if c.best), None)
        if best is None or len(lrs) < 2:
            continue
        if set((pending or {}).get((best.task, best.method), ())) - set(lrs):
            continue
        scored = [c for c in fam if not math.isnan(c.stat(c.metric)[0])]
        rows, baseline = selection_rows(scored)  # as the choice compared them
        eff = effective_scores(rows, baseline, points_per_unit(best.task))
        score = {id(c): x[0] for c, x in zip(scored, eff, strict=True)}
        others = [score[id(c)] for c in scored if c is not best]
        mine = score[id(best)]
        grid = ", ".join(f"{lr:g}" for lr in lrs)
        where = f"{best.task} {best.method} ({best.model}, {best.group})"
        if is_ablation(best.group):  # an axis with its own grid: one family per setting
            where = f"{best.task} {best.method} {best.variant} ({best.model}, {best.group})"
        if best.rule_lr is not None:
            out.append(_seeded_elsewhere(where, best))
            continue
        if len(scored) == len(lrs) and all(v == mine for v in others):
            out.append(_all_tied(where, lrs, _tie(rows, baseline, best), best))
            continue
        if lrs[0] < best.lr < lrs[-1] or any(v >= mine for v in others):
            continue
        side = "highest" if best.lr == lrs[-1] else "lowest"
        out.append(
            f"{where}: the best learning rate, {best.lr:g}, is the {side} of its grid ({grid}). "
            f"A learning rate beyond it may score better, so this method may be under-tuned: "
            f"add one to the grid (in a study spec, under a new `name`: the finished points are "
            f"reused, only the new ones train)."
        )
    return out


def _tie(rows: list[tuple], baseline: float, best: Cell) -> str:
    """How a grid's rates tied (`rows` and `baseline`: `choice.selection_rows`): on the same
    score, or all near the majority baseline."""
    k = points_per_unit(best.task)
    values = sorted({k * x[0] for x in rows})
    if len(values) == 1:
        return f"scored the same ({best.metric} {values[0]:.2f} points)"
    base = k * baseline
    return (
        f"scored within {UNINFORMATIVE_POINTS:g} point of the majority baseline ({best.metric} "
        f"{values[0]:.2f} to {values[-1]:.2f} points against its {base:.2f}), which shows nothing "
        "learned: they count as tied"
    )


def _all_tied(where: str, lrs: list[float], tie: str, best: Cell) -> str:
    """The warning for a grid (`lrs`, sorted) whose every rate tied on the main metric
    (`_tie` says how): the rate it runs the other seeds at, and why."""
    grid = ", ".join(f"{lr:g}" for lr in lrs)
    same = f"{where}: every learning rate of its grid ({grid}) {tie}"
    if not best.chosen_by_loss:
        return (
            f"{same}, so the grid chose none; its other seeds run at the smallest, {best.lr:g}. A "
            f"wider grid cannot tell rates apart that all end at the same score: compare it "
            f"with the majority baseline."
        )
    side = "highest" if best.lr == lrs[-1] else "lowest"
    beyond = (
        f" It is the {side} of its grid: a rate beyond it may learn faster (add one to the "
        f"grid, in a study spec under a new `name`)."
        if best.lr in (lrs[0], lrs[-1])
        else ""
    )
    return (
        f"{same}; the lowest final dev loss chose {best.lr:g} (its other seeds run there): the "
        f"metric does not tell these rates apart yet, the loss does.{beyond} Compare the "
        f"scores with the majority baseline."
    )


def _seeded_elsewhere(where: str, best: Cell) -> str:
    """The warning for a best rate kept because the other seeds ran there (`aggregate`)."""
    return (
        f"{where}: the other seeds ran at {best.lr:g}, the rate chosen when they were run; the "
        f"learning-rate rule now chooses {best.rule_lr:g} (see the note on how rates are "
        f"chosen), which has no other seeds, so the tables compare at {best.lr:g}. To compare "
        f"at {best.rule_lr:g}, run the study again under a new `name`: the finished points are "
        f"reused, and its other seeds run there."
    )
