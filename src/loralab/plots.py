"""Report figures (matplotlib's object API with the Agg canvas: no pyplot state, no display)."""

from __future__ import annotations

import math
from pathlib import Path


def _figure(n: int, width: float = 4.6, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n, i + 1) for i in range(n)]


def _ms(cell) -> tuple[float, float]:
    from .report import points_per_unit

    mean, std = cell.stat(cell.metric)
    k = points_per_unit(cell.task)
    return k * mean, 0.0 if math.isnan(std) else k * std


def lora_vs_full(comps, path: Path) -> Path:
    """Grouped bars per task: full fine-tuning vs LoRA at their best learning rates."""
    fig, (ax,) = _figure(1, width=max(4.6, 1.8 * len(comps) + 2))
    for i, c in enumerate(comps):
        for j, (cell, color) in enumerate(((c.full, "#888888"), (c.lora, "#1f77b4"))):
            if cell is None:
                continue
            mean, std = _ms(cell)
            ax.bar(i + (j - 0.5) * 0.38, mean, 0.36, yerr=std, capsize=4, color=color,
                   label=("full fine-tuning", "LoRA")[j] if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(comps)), [f"{c.task}\n{c.model}" for c in comps])
    ax.set_ylabel("main metric (points), mean ± std over seeds")
    ax.set_title("LoRA vs full fine-tuning (best lr each)")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)
    return path


def ablation(cells, kind: str, path: Path) -> Path:
    """Main metric vs rank / alpha / module preset; one panel per task, best lr per setting."""
    tasks = sorted({(c.task, c.model) for c in cells})
    fig, axes = _figure(len(tasks))
    for ax, (task, model) in zip(axes, tasks, strict=True):
        mine = [c for c in cells if (c.task, c.model) == (task, model)]
        if kind == "modules":
            order = ["standard", "extended", "all-linear"]
            mine.sort(key=lambda c: order.index(c.variant[2]) if c.variant[2] in order else 3)
            stats = [_ms(c) for c in mine]
            ax.bar(range(len(mine)), [s[0] for s in stats], yerr=[s[1] for s in stats],
                   capsize=4, color="#1f77b4")  # fmt: skip
            ax.set_xticks(range(len(mine)), [c.variant[2] for c in mine])
            ax.set_xlabel("LoRA target modules")
        else:
            # x: r (rank, all) or alpha; one line per setting of the other factors
            x = 1 if kind == "alpha" else 0
            lines: dict[str, list] = {}
            for c in mine:
                label = {"rank": c.variant[2], "alpha": f"r={c.variant[0]}, {c.variant[2]}",
                         "all": f"α={c.variant[1]:g}, {c.variant[2]}"}.get(kind, "")  # fmt: skip
                lines.setdefault(label, []).append(c)
            for label, group in sorted(lines.items()):
                group.sort(key=lambda c: c.variant[x])
                stats = [_ms(c) for c in group]
                ax.errorbar([c.variant[x] for c in group], [s[0] for s in stats],
                            yerr=[s[1] for s in stats], marker="o", capsize=4, label=label)  # fmt: skip
            ax.set_xscale("log", base=2)
            xs = sorted({c.variant[x] for c in mine})
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
            ax.set_xlabel({"rank": "rank r (alpha = 2r)", "alpha": "alpha"}.get(kind, "rank r"))
            if len(lines) > 1:
                ax.legend(fontsize=7)
        ax.set_ylabel("main metric (points)")
        ax.set_title(f"{task} ({model})")
    fig.suptitle(f"Ablation: {kind}")
    fig.savefig(path, dpi=110)
    return path


def make_figures(cells, comps, folder: Path) -> list[tuple[str, Path]]:
    """(title, path) of every figure the data allow."""
    out = []
    if comps:
        out.append(("LoRA vs full fine-tuning", lora_vs_full(comps, folder / "lora_vs_full.png")))
    best = [c for c in cells if c.best and c.variant]
    for group in sorted({c.group for c in best if c.group.startswith("ablation-")}):
        kind = group.removeprefix("ablation-")
        mine = [c for c in best if c.group == group]
        out.append((f"Ablation: {kind}", ablation(mine, kind, folder / f"ablation_{kind}.png")))
    return out
