"""Report figures (matplotlib's object API with the Agg canvas: no pyplot state, no display).

Every y axis names its metric; legends sit outside the axes, so they never cover data. A LoRA
variant is labelled by its readable slug (`variants.lora_slug`: `r=8 α=16 dora`).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from ..models.registry import caveat
from ..rundir import METRICS_FILE
from ..tasks import task_label  # a file reference by its file's name: a tick label, not a path
from .aggregate import DROP_TARGET_POINTS, ablation_base, full_reference, is_ablation, paired_diffs
from .records import points_per_unit
from .stats import t_interval
from .variants import LORA_DEFAULTS, variant_label

COLORS = {"lora": "#1f77b4", "full": "#555555"}
NAMES = {"lora": "LoRA", "full": "full fine-tuning"}


def _figure(n: int, width: float = 4.6, height: float = 3.4, cols: int = 3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(n, cols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]


def _legend_outside(fig, axes) -> None:
    """One legend for the figure, below the panels (constrained layout makes room), so it
    covers no data and no title."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", fontsize=8,
                   ncols=legend_columns(list(seen), fig.get_size_inches()[0]), frameon=False)  # fmt: skip


def legend_columns(labels: list[str], width_in: float) -> int:
    """The most legend columns (up to 3) whose labels fit the figure's width: a one-panel
    figure's long labels side by side would be cut at its edges. Legends fill column by column;
    a column is as wide as its longest label (~0.065 in a character at 8 pt) plus the marker."""
    for n in range(min(3, len(labels)), 1, -1):
        sizes = [len(labels) // n + (i < len(labels) % n) for i in range(n)]  # as matplotlib
        starts = [sum(sizes[:i]) for i in range(n)]
        cols = [labels[a : a + k] for a, k in zip(starts, sizes, strict=True)]
        if sum(0.065 * max(map(len, c)) + 0.5 for c in cols) <= width_in:
            return n
    return 1


def _ms(cell) -> tuple[float, float]:
    mean, std = cell.stat(cell.metric)
    k = points_per_unit(cell.task)
    return k * mean, 0.0 if math.isnan(std) else k * std


def _points(cell, value: float) -> float:
    return points_per_unit(cell.task) * value


def lora_vs_full_figure(comps):
    """Grouped bars per comparison, full fine-tuning vs LoRA at their best learning rates,
    labelled by task, model and the variant's slug."""
    fig, (ax,) = _figure(1, width=max(4.6, 1.6 * len(comps) + 1.5))
    for i, c in enumerate(comps):
        for j, cell in enumerate((c.full, c.lora)):
            if cell is None:
                continue
            mean, std = _ms(cell)
            ax.bar(i + (j - 0.5) * 0.38, mean, 0.36, yerr=std, capsize=4,
                   color=COLORS[cell.method], label=NAMES[cell.method])  # fmt: skip
        base = c.lora.reference("majority")
        if not math.isnan(base):
            ax.hlines(_points(c.lora, base), i - 0.45, i + 0.45, colors="#cf222e",
                      linestyles=":", label="majority baseline")  # fmt: skip
    labels = [f"{task_label(c.task)} ({c.lora.metric})\n{c.model}\n{c.lora.variant}" for c in comps]
    ax.set_xticks(range(len(comps)), labels, fontsize=7)
    metrics = sorted({c.lora.metric for c in comps})
    ax.set_ylabel(f"{' / '.join(metrics)} (points), mean ± std")
    ax.set_title("LoRA vs full fine-tuning (best lr each)")
    _legend_outside(fig, [ax])
    return fig


def _mean_with_interval(ax, y: float, interval: tuple[float, float, float]) -> None:
    """A paired row's (mean, low, high) at height `y`: a diamond with its 95% interval."""
    mean, lo, hi = interval
    err = [[mean - lo], [hi - mean]] if not math.isnan(lo) else None
    ax.errorbar([mean], [y], xerr=err, fmt="D", ms=6, capsize=4, color=COLORS["lora"],
                label="mean, 95% interval")  # fmt: skip


def paired_differences(comps):
    """LoRA − full fine-tuning per comparison with seeds in common (one row each): the seeds'
    paired differences as dots (hollow on the seeds that picked a learning rate), their mean with
    its 95% interval, zero and the target marked. None when no comparison has a seed in common."""
    rows = [c for c in comps if c.diffs]
    if not rows:
        return None
    fig, (ax,) = _figure(1, width=6.0, height=0.6 * len(rows) + 1.6)
    for i, c in enumerate(rows):
        y = len(rows) - 1 - i  # the first comparison on top
        picked = [d for (s, _, _), d in zip(c.pairs, c.diffs, strict=True) if s in c.picked_seeds]
        held = c.held_out_diffs
        if held:
            ax.plot(held, [y] * len(held), "o", ms=4, color="#9ab7d8", label="one seed")
        if picked:  # hollow: each method's score there is its grid's maximum
            ax.plot(picked, [y] * len(picked), "o", ms=5, mfc="none", color="#9ab7d8",
                    label="a seed that picked the lr")  # fmt: skip
        _mean_with_interval(ax, y, c.interval)
    ax.axvline(0.0, color="#555555", lw=0.8)
    ax.axvline(-DROP_TARGET_POINTS, color="#cf222e", ls=":", label=f"target: −{DROP_TARGET_POINTS:g}")  # fmt: skip
    labels = [f"{task_label(c.task)} ({c.lora.metric})\n{c.model} {c.lora.variant}" for c in rows]
    ax.set_yticks(range(len(rows)), labels[::-1], fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("LoRA − full fine-tuning (points), paired by seed")
    ax.set_title("LoRA − full fine-tuning per seed (best lr each)")
    _legend_outside(fig, [ax])
    return fig


def _curve(run: dict, metric: str) -> tuple[list, list]:
    """(steps, values) of `eval/<metric>` in a run's metrics.jsonl."""
    path = Path(run.get("run_dir") or "") / METRICS_FILE
    if not run.get("run_dir") or not path.is_file():
        return [], []
    points = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if f"eval/{metric}" in rec and rec.get("step") is not None:
            points[rec["step"]] = rec[f"eval/{metric}"]
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def learning_curves(comps, loss: bool = False):
    """Figure: eval metric (`loss`: the dev loss) vs training step, LoRA vs full, a panel per
    comparison with such a curve; None if no data. The loss curve tells runs apart where every
    one of them sits at the majority baseline (SQuAD v2 on a CPU budget)."""
    panels = []
    for c in comps:
        lines = []
        for cell in (c.lora, c.full):
            for run in cell.done if cell else []:
                steps, values = _curve(run, "loss" if loss else cell.metric)
                if steps:
                    lines.append((cell, steps, values if loss else [_points(cell, v) for v in values]))  # fmt: skip
        if lines:
            panels.append((c, lines))
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (c, lines) in zip(axes, panels, strict=True):
        for cell, steps, values in lines:
            ax.plot(steps, values, marker="o", ms=3, lw=1.2, alpha=0.8, color=COLORS[cell.method],
                    label=f"{NAMES[cell.method]}, one line per seed")  # fmt: skip
        base = math.nan if loss else c.lora.reference("majority")
        if not math.isnan(base):
            ax.axhline(_points(c.lora, base), color="#cf222e", ls=":", label="majority baseline")
        ax.set_xlabel("training step")
        ax.set_ylabel("dev loss" if loss else f"dev {c.lora.metric} (points)")
        # Each panel's own rates: one legend for the figure cannot name them per task.
        rates = f"lr LoRA {c.lora.lr:g}" + (f", full {c.full.lr:g}" if c.full else "")
        ax.set_title(f"{task_label(c.task)} · {c.head} · {c.model}\n{c.lora.variant} · {rates}", fontsize=9)  # fmt: skip
    _legend_outside(fig, axes)
    return fig


NUMERIC_AXES = ("r", "alpha", "dropout")


def _axis(cells) -> tuple[str | None, list[str]]:
    """The LoRA setting on the x axis (r, then alpha, then dropout) and the others that vary."""
    varying = []
    keys = sorted({k for c in cells for k in (c.lora or {})})
    for k in keys:
        if len({json.dumps((c.lora or {}).get(k), sort_keys=True) for c in cells}) > 1:
            varying.append(k)
    x = next((k for k in NUMERIC_AXES if k in varying), None)
    return x, [k for k in varying if k != x]


def _share_key(cell) -> float:
    share = cell.avg("trainable_share_without_head_pct")
    return math.inf if math.isnan(share) else share


def _base_label(lora: dict, others: list[str]) -> str:
    """The tick of a setting whose slug is empty (every ablated key at its default): the value
    itself where one text-valued key varies ('standard' among presets), else 'defaults'."""
    value = lora.get(others[0]) if len(others) == 1 else None
    return value if isinstance(value, str) else "defaults"


def _rates(ax, xs: list, cells: list, stats: list) -> None:
    """Each point's learning rate beside it, where an axis with its own lr grid chose several:
    a setting that won at another rate than the base must say so on the figure too."""
    if len({c.lr for c in cells}) < 2:
        return
    for x, c, (mean, _) in zip(xs, cells, stats, strict=True):
        ax.annotate(f"lr {c.lr:g}", (x, mean), textcoords="offset points", xytext=(6, -3), fontsize=7)  # fmt: skip


def ablation(cells, kind: str, reference):
    """Main metric vs the ablated LoRA setting; one panel per (task, model, head), best lr per
    setting; the comparable full fine-tuning level as a horizontal reference line. Lines and
    ticks are labelled by the variants' slugs (the settings that tell them apart)."""
    panels = sorted({(c.task, c.model, c.head) for c in cells})
    fig, axes = _figure(len(panels))
    for ax, key in zip(axes, panels, strict=True):
        mine = [c for c in cells if (c.task, c.model, c.head) == key]
        x, others = _axis(mine)
        if x is not None:
            # Settings that move with x (alpha = 2r) belong to the x label, not to extra lines.
            tied = [k for k in others if all(len({json.dumps(c.lora.get(k)) for c in mine if c.lora[x] == v}) == 1
                                             for v in {c.lora[x] for c in mine})]  # fmt: skip
            lines: dict[str, list] = {}
            for c in mine:
                label = variant_label(c.lora, [k for k in others if k not in tied])
                lines.setdefault(label or "LoRA", []).append(c)
            for label, group in sorted(lines.items()):
                group.sort(key=lambda c: c.lora[x])
                stats = [_ms(c) for c in group]
                ax.errorbar([c.lora[x] for c in group], [s[0] for s in stats],
                            yerr=[s[1] for s in stats], marker="o", capsize=4, label=label)  # fmt: skip
                _rates(ax, [c.lora[x] for c in group], group, stats)
            xs = sorted({c.lora[x] for c in mine})
            if x in ("r", "alpha") and min(xs) > 0:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
            ax.set_xlabel({"r": "rank r", "alpha": "alpha"}.get(x, x) + (f" ({', '.join(tied)} moving with it)" if tied else ""))  # fmt: skip
        else:  # categorical: presets, DoRA/rsLoRA, init, ...
            # Smallest trainable share first (standard, extended, all-linear), ties as they came.
            mine.sort(key=_share_key)
            stats = [_ms(c) for c in mine]
            ax.errorbar(range(len(mine)), [s[0] for s in stats], yerr=[s[1] for s in stats],
                        fmt="o", capsize=4, color=COLORS["lora"], label="LoRA")  # fmt: skip
            _rates(ax, list(range(len(mine))), mine, stats)
            keys = others or list(LORA_DEFAULTS)  # what tells them apart, else all but r and α
            names = [variant_label(c.lora, keys) or _base_label(c.lora, others) for c in mine]
            ax.set_xticks(range(len(mine)), names, fontsize=8, rotation=20)
            ax.set_xlim(-0.6, len(mine) - 0.4)
            ax.set_xlabel("LoRA variant (" + ", ".join(others) + ")" if others else "LoRA variant")
        ref = reference(mine[0])
        if ref is not None:
            ax.axhline(_ms(ref)[0], color=COLORS["full"], ls="--",
                       label=f"full fine-tuning (lr {ref.lr:g})")  # fmt: skip
        ax.set_ylabel(f"dev {mine[0].metric} (points)")
        _panel_title(ax, key)
    fig.suptitle(f"Ablation: {kind} (best lr per setting)")
    _legend_outside(fig, axes)
    return fig


def _panel_title(ax, key: tuple) -> None:
    """An ablation panel's (task, model, head) as its title."""
    ax.set_title(f"{task_label(key[0])} · {key[2]} · {key[1]}", fontsize=9)


def _setting_name(cell, keys: list[str], others: list[str]) -> str:
    return variant_label(cell.lora, keys) or _base_label(cell.lora, others)


def ablation_paired(cells, kind: str, base, reference):
    """Each setting minus the axis's base (`base(cell)`), paired by seed: one row per setting
    with a seed in common, its seeds' differences as dots and their mean with its 95% interval;
    zero, and where full fine-tuning sits against the base on the base's seeds (the mean of
    full − base), marked. One panel per (task, model, head); None when no setting pairs."""
    panels: dict[tuple, list] = {}
    for c in cells:
        b = base(c)
        if b is not None and b is not c and paired_diffs(c, b):
            panels.setdefault((c.task, c.model, c.head), []).append((c, b))
    if not panels:
        return None
    rows = max(len(v) for v in panels.values())
    fig, axes = _figure(len(panels), width=5.2, height=0.6 * rows + 1.6, cols=2)
    for ax, (key, pairs) in zip(axes, sorted(panels.items()), strict=True):
        x, others = _axis([c for pair in pairs for c in pair])
        keys = ([x] if x else []) + others or list(LORA_DEFAULTS)
        name = functools.partial(_setting_name, keys=keys, others=others)
        pairs.sort(key=lambda p: (p[0].lora[x], p[0].variant) if x else (_share_key(p[0]), p[0].variant))  # fmt: skip
        several_lrs = len({c.lr for pair in pairs for c in pair}) > 1
        for i, (c, b) in enumerate(pairs):
            y, diffs = len(pairs) - 1 - i, paired_diffs(c, b)  # the first setting on top
            ax.plot(diffs, [y] * len(diffs), "o", ms=4, color="#9ab7d8", label="one seed")
            _mean_with_interval(ax, y, t_interval(diffs))
        labels = [name(c) + (f", lr {c.lr:g}" if several_lrs else "") for c, _ in pairs]
        ax.set_yticks(range(len(pairs)), labels[::-1], fontsize=7)
        ax.set_ylim(-0.7, len(pairs) - 0.3)
        ax.axvline(0.0, color="#555555", lw=0.8)
        b = pairs[0][1]
        ref = reference(b)
        if ref is not None and (gap := paired_diffs(ref, b)):
            ax.axvline(sum(gap) / len(gap), color=COLORS["full"], ls="--",
                       label=f"full fine-tuning − base (lr {ref.lr:g}, mean)")  # fmt: skip
        ax.set_xlabel(f"− {name(b)} (points of dev {b.metric}), paired by seed")
        _panel_title(ax, key)
    fig.suptitle(f"Ablation: {kind}, each setting − the base, paired by seed")
    _legend_outside(fig, axes)
    return fig


def add_caveats(fig, models: set[str]) -> None:
    """The shown models' caveats (SmolLM2: dequantised weights) above the figure's legend, or
    under its panels: a figure copied out of the report must still say what was trained."""
    import textwrap

    # ~14 characters per inch of figure at 7 pt: a one-panel figure's line must not be clipped.
    width = max(40, int(fig.get_size_inches()[0] * 14))
    notes = "\n".join(textwrap.fill(note, width) for m in sorted(models) if (note := caveat(m)))
    if notes and fig.legends:
        fig.legends[0].set_title(notes, prop={"size": 7})
    elif notes:  # nothing labelled, so no legend: a line under the panels instead
        fig.supxlabel(notes, fontsize=7)


def make_figures(cells, comps, folder: Path) -> list[tuple[str, Path]]:
    """(title, PNG path) of every figure the data allow; each also written as PDF beside it."""
    figures = []  # (title, file name, figure or None, the models it shows)
    if comps:
        shown = {c.model for c in comps}
        figures += [
            ("LoRA vs full fine-tuning", "lora_vs_full.png", lora_vs_full_figure(comps), shown),
            ("LoRA − full fine-tuning, paired by seed", "paired_differences.png", paired_differences(comps), shown),
            ("Learning curves: dev metric vs training step", "learning_curves.png", learning_curves(comps), shown),
            ("Dev loss vs training step", "dev_loss_curves.png", learning_curves(comps, loss=True), shown),
        ]  # fmt: skip
    best = [c for c in cells if c.best and c.lora]
    for group in sorted({c.group for c in best if is_ablation(c.group)}):
        kind = group.removeprefix("ablation-")
        mine = [c for c in best if c.group == group]
        ref = lambda c: full_reference(c, cells)  # noqa: E731
        fig = ablation(mine, kind, ref)
        figures.append((f"Ablation: {kind}", f"ablation_{kind}.png", fig, {c.model for c in mine}))
        fig = ablation_paired(mine, kind, lambda c: ablation_base(c, cells), ref)
        figures.append((f"Ablation: {kind}, paired with the base by seed", f"ablation_{kind}_paired.png", fig, {c.model for c in mine}))  # fmt: skip
    out = []
    for title, name, fig, models in figures:
        if fig is not None:
            add_caveats(fig, models)
            fig.savefig(folder / name, dpi=110)
            # The same figure as vector graphics for a paper (report.tex includes it), without a
            # creation date: a report regenerated from the same runs is byte-identical.
            fig.savefig((folder / name).with_suffix(".pdf"), metadata={"CreationDate": None})
            out.append((title, folder / name))
    return out
