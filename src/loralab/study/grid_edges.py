"""The report's warnings about learning-rate grids: a best rate at the edge of its grid (the
optimum may lie beyond it), and a grid whose rates all scored the same."""

from __future__ import annotations

import math

from .aggregate import Cell, families, is_ablation, selection_score
from .records import points_per_unit


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
        score = selection_score(scored)
        others = [score(c) for c in scored if c is not best]
        grid = ", ".join(f"{lr:g}" for lr in lrs)
        where = f"{best.task} {best.method} ({best.model}, {best.group})"
        if is_ablation(best.group):  # an axis with its own grid: one family per setting
            where = f"{best.task} {best.method} {best.variant} ({best.model}, {best.group})"
        if len(scored) == len(lrs) and all(v == score(best) for v in others):
            value = f"{best.metric} {points_per_unit(best.task) * score(best):.2f} points"
            out.append(_all_tied(where, lrs, value, best))
            continue
        if lrs[0] < best.lr < lrs[-1] or any(v >= score(best) for v in others):
            continue
        side = "highest" if best.lr == lrs[-1] else "lowest"
        out.append(
            f"{where}: the best learning rate, {best.lr:g}, is the {side} of its grid ({grid}). "
            f"A learning rate beyond it may score better, so this method may be under-tuned: "
            f"add one to the grid (in a study spec, under a new `name`: the finished points are "
            f"reused, only the new ones train)."
        )
    return out


def _all_tied(where: str, lrs: list[float], value: str, best: Cell) -> str:
    """The warning for a grid (`lrs`, sorted) whose every rate scored the same on the main
    metric: the rate it runs the other seeds at, and why."""
    grid = ", ".join(f"{lr:g}" for lr in lrs)
    same = f"{where}: every learning rate of its grid ({grid}) scored the same ({value})"
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
