"""Caveats on a comparison's time and memory columns: the two methods' runs (or an ablation
axis's settings) were made differently (heap allocator, cores lent, machine), so the ratio
would measure that, not the methods. One warning per comparison or axis, for the report's
header."""

from __future__ import annotations

from collections import Counter

from .aggregate import Cell, Comparison, families, is_ablation


def _mixed(comp: Comparison, label) -> str | None:
    """How the two methods' runs of `comp` split by `label(record)` ("LoRA: a ×2; full
    fine-tuning: a ×1, b ×1"), or None when every run has the same label. Runs labelled None
    (unknown) are left out."""
    if comp.full is None:
        return None
    return _split([("LoRA", comp.lora), ("full fine-tuning", comp.full)], label)


def _split(named: list[tuple[str, Cell]], label) -> str | None:
    """`_mixed` for any named cells."""
    used = {
        name: Counter(x for r in cell.done if (x := label(r)) is not None) for name, cell in named
    }
    if len(set().union(*used.values())) < 2:
        return None
    return "; ".join(
        f"{name}: " + ", ".join(f"{k} ×{n}" for k, n in sorted(c.items()))
        for name, c in used.items()
    )


def allocator_warnings(comps: list[Comparison]) -> list[str]:
    """One warning per comparison whose runs' peak memory is not comparable: they ran under
    different heap allocators (`loralab.allocator`: the allocator alone moved a run's peak RSS
    by ~25%). Runs from before the allocator was recorded count as "unrecorded"."""
    out = []
    for comp in comps:
        if (ran := _mixed(comp, lambda r: r.get("allocator") or "unrecorded")) is not None:
            out.append(
                f"{comp.task} ({comp.model}): peak memory is not comparable between the methods: "
                f"their runs used different heap allocators ({ran}), and the allocator alone "
                f"changes a run's peak by up to ~25%. Compare memory on runs under one allocator "
                f"(LORALAB_ALLOCATOR)."
            )
    return out


def hardware_warnings(comps: list[Comparison]) -> list[str]:
    """One warning per comparison whose runs ran on different machines (`tracking.hardware`;
    runs from before it was recorded are left out): the same SmolLM2 step takes several times
    longer on an AVX2-only EPYC than on an AMX Xeon, so the time columns would compare
    machines, not methods."""
    out = []
    for comp in comps:
        if (ran := _mixed(comp, lambda r: r.get("hardware"))) is not None:
            out.append(
                f"{comp.task} ({comp.model}): times are not comparable between the methods: "
                f"their runs ran on different machines ({ran}; hardware in runs.csv). Compare "
                f"times on runs from one machine."
            )
    return out


def ablation_hardware_warnings(cells: list[Cell]) -> list[str]:
    """One warning per ablation axis (and task, model) whose settings' runs ran on different
    machines: an axis's base value reuses the study's own runs, often made earlier elsewhere
    (SmolLM2's q/v runs on an AMX Xeon took ~2.3 training-CPU minutes, the same settings on an
    AMD EPYC ~6), so its time columns would compare machines, not settings."""
    out = []
    best = [c for c in cells if c.best and c.lora and is_ablation(c.group)]
    for group, task, model in sorted({(c.group, c.task, c.model) for c in best}):
        mine = [c for c in best if (c.group, c.task, c.model) == (group, task, model)]
        if (ran := _split([(c.variant, c) for c in mine], lambda r: r.get("hardware"))) is not None:  # fmt: skip
            out.append(
                f"{task} ({model}), {group}: times are not comparable between its settings: "
                f"their runs ran on different machines ({ran}; hardware in runs.csv). Compare "
                f"times on runs from one machine."
            )
    return out


LENT_MIN = 0.05  # a run lent idle cores for under 5% of its time counts as run on its own


def _lent_label(rec: dict) -> str:
    return "lent cores" if (rec.get("lent_share") or 0) > LENT_MIN else "own"


def lent_warnings(comps: list[Comparison]) -> list[str]:
    """One warning per comparison where some runs were lent idle cores (`study.spare_cores`) and
    others not: their wall and CPU times are not comparable (a second thread cut a SmolLM2 step
    from 28.8 to 19.8 s: less wall time, more CPU time)."""
    out = []
    for comp in comps:
        if (ran := _mixed(comp, _lent_label)) is not None:
            out.append(
                f"{comp.task} ({comp.model}): times are not comparable between the methods: some "
                f"runs were lent idle cores for part of their time ({ran}; lent_share in "
                f"runs.csv), which shortens wall time and adds CPU time. Compare times on runs "
                f"made alike (LORALAB_LEND_CORES=0 turns lending off)."
            )
    return out


def diverged_warnings(cells: list[Cell]) -> list[str]:
    """One warning per setting (a cell family: equal but for the lr) whose every run diverged
    or finished without the main metric: it has no best lr, so no row in the tables, and a
    comparison it belonged to reads 'no comparable full run' or is missing; the warning says
    why."""
    out = []
    for fam in families(cells):
        if any(c.scored for c in fam):
            continue
        c, n = fam[0], sum(len(c.runs) for c in fam)
        lrs = ", ".join(f"{x.lr:g}" for x in fam)
        name = f"{c.task} {c.method}" + (f" {c.variant}" if c.method == "lora" else "")
        where = f"{name} ({c.model}, {c.group})"
        if not any(c.done for c in fam):
            out.append(
                f"{where}: every one of its {n} run{'s' * (n != 1)} diverged (lr {lrs}): it has "
                "no row in the tables. Lower learning rates (or a check of the data and the "
                "model's precision) would give it one."
            )
        else:  # completed, but none recorded the metric the tables rank on
            out.append(
                f"{where}: none of its {n} run{'s' * (n != 1)} (lr {lrs}) recorded {c.metric}, the "
                "task's main metric, so it has no row in the tables; its summaries' metrics "
                "say what they did record."
            )
    return out


def lost_seed_warnings(comps: list[Comparison]) -> list[str]:
    """One warning per comparison whose method lost seeds at its chosen rate (diverged, or no
    main metric): the paired interval and its verdict rest on the other seeds only, and a
    method that fails on some seeds is worse than its mean says."""
    out = []
    for comp in comps:
        for name, cell in (("LoRA", comp.lora), ("full fine-tuning", comp.full)):
            if cell is None:
                continue
            scored = {r["seed"] for r in cell.scored}
            lost = sorted({r["seed"] for r in cell.runs} - scored, key=str)
            if lost:
                seeds = ", ".join(map(str, lost))
                out.append(
                    f"{comp.task} ({comp.model}): {name} at its best lr ({cell.lr:g}) diverged or "
                    f"scored no {cell.metric} on seed{'s' * (len(lost) > 1)} {seeds}; LoRA − full "
                    "and its verdict stand on the other seeds alone, so read them with that loss."
                )
    return out
