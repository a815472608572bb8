"""How a family of cells (equal but for the learning rate) chooses its rate: the best mean dev
score of the task's main metric on the seeds every rate ran, scores near the majority baseline
tied, ties to the lower final dev loss, else the smaller rate (`stats.best_rate`), as the
study's own choice does (`phases.best_so_far`). Cells are `aggregate.Cell`s."""

from __future__ import annotations

import math

from .records import final_loss, points_per_unit
from .stats import best_rate
from .variants import is_number


def choose_rate(scored: list) -> None:
    """Mark the best of `scored` (cells with a score, one family): `best`, `chosen_by_loss`,
    `chose_lr_on`, and `rule_lr` where the other seeds ran at another rate than the rule's."""
    rows, baseline = selection_rows(scored)
    shared = shared_seeds(scored)
    lr, by_loss = best_rate(rows, baseline, points_per_unit(scored[0].task))
    winner = next(c for c in scored if c.lr == lr)
    seeded = [c for c in scored if {r["seed"] for r in c.runs} - shared]
    if seeded and winner not in seeded:
        # The study ran the other seeds at a rate chosen under an older rule (or before the
        # grid grew): compare there, where the seeds are; the report says so (`grid_edges`).
        winner = ran_seeds_at(seeded, {r[1]: r[0] for r in rows})
        winner.rule_lr, by_loss = lr, False
    winner.best, winner.chosen_by_loss = True, by_loss
    if len(scored) > 1:  # with no seed in common, every seed took part
        winner.chose_lr_on = shared or frozenset(r["seed"] for c in scored for r in c.done)


def ran_seeds_at(seeded: list, scores: dict[float, float]):
    """Of the cells that ran seeds beyond the ones all rates share, the one with most seeds
    (then the best score on the shared seeds, `scores`: lr -> score): where the study ran its
    other seeds."""
    return max(seeded, key=lambda c: (len({r["seed"] for r in c.runs}), scores[c.lr], -c.lr))


def shared_seeds(cells: list) -> frozenset:
    """The seeds every cell has run to the end, completed or diverged (empty when they share
    none): a run that diverged took part in the choice, as it does in the study's."""
    return frozenset(set.intersection(*({r["seed"] for r in c.runs} for c in cells)))


def selection_rows(cells: list) -> tuple[list[tuple], float]:
    """What a family's choice of rate compares (`stats.best_rate`): (score on the shared seeds,
    lr, mean dev loss on them or None) per cell, in order, and the majority baseline (NaN)."""
    score, shared = selection_score(cells), shared_seeds(cells)
    refs = [b for c in cells if not math.isnan(b := c.reference("majority"))]
    baseline = sum(refs) / len(refs) if refs else math.nan
    return [(score(c), c.lr, dev_loss(c, shared)) for c in cells], baseline


def selection_score(cells: list):
    """Score learning rates on the seeds every one of them has (the LoRA paper's choice on dev).

    With a grid on the first seed and the other seeds at the winner, comparing means over all
    seeds would set the winner's three seeds against the others' one: only the shared seed(s)
    compare like with like, and that is also what the study chose on.
    """
    shared = shared_seeds(cells)

    def score(c) -> float:
        vals = []
        for r in c.runs:
            if r["seed"] not in shared:
                continue
            # Diverged, or finished without the main metric: its rate cannot win, as in the
            # study's own choice (`best_so_far`, `phases.grid_values`).
            value = (r.get("metrics") or {}).get(c.metric) if r["status"] == "completed" else None
            vals.append(value if is_number(value) else -math.inf)
        return sum(vals) / len(vals) if vals else c.stat(c.metric)[0]

    return score


def dev_loss(c, seeds: frozenset) -> float | None:
    """The mean final dev loss of `c`'s runs on `seeds` (all of them when empty); None where
    one diverged or lacks it (runs before 2026-12-05, heads that give none), as for the study's
    own choice (`phases.best_so_far`)."""
    runs = [r for r in c.runs if not seeds or r["seed"] in seeds]
    vals = [final_loss(r) if r["status"] == "completed" else None for r in runs]
    return None if not vals or None in vals else sum(vals) / len(vals)
