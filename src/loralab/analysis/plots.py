"""analysis/ plots, from analysis.json's data (matplotlib's object API: no pyplot state, no
display needed)."""

from __future__ import annotations

from pathlib import Path

from .modules import mean, module_role


def _save(fig, path: Path, model: str | None) -> Path:
    """Save `fig` footed with the model it shows and, for a built-in with one, its caveat
    (SmolLM2: dequantised weights): a PNG copied out of analysis/ must still say what was
    trained (the report's figures do the same, `study.plots.add_caveats`)."""
    import textwrap

    from ..models.registry import caveat

    if model:
        width = max(40, int(fig.get_size_inches()[0] * 14))  # ~14 characters per inch at 7 pt
        fig.supxlabel(textwrap.fill(caveat(model) or f"model: {model}", width), fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def _figure(ncols: int, width: float = 4.4, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _series(modules: dict, value) -> dict[str, tuple[list, list]]:
    """{role: (layers, values)}: one line per module role (q_proj, v_proj, ...) across layers."""
    out: dict[str, list] = {}
    for i, (name, m) in enumerate(modules.items()):
        layer = m["layer"] if m["layer"] is not None else i
        out.setdefault(module_role(name), []).append((layer, value(m)))
    return {k: ([p[0] for p in sorted(v)], [p[1] for p in sorted(v)]) for k, v in out.items()}


def _layer_axis(ax, title: str, legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend:
        ax.legend(fontsize=7)


def plot_spectra(path: Path, modules: dict, model: str | None = None) -> Path:
    """Singular values of ΔW, one panel per module kind, one line per module (colour = layer)."""
    from matplotlib import colormaps

    kinds = list(dict.fromkeys(m["kind"] for m in modules.values()))
    fig, axes = _figure(len(kinds))
    top = max(m["layer"] or 0 for m in modules.values()) or 1
    for ax, kind in zip(axes, kinds, strict=True):
        for m in modules.values():
            if m["kind"] == kind:
                sv = m["singular_values"]
                colour = colormaps["viridis"]((m["layer"] or 0) / top)
                ax.plot(range(1, len(sv) + 1), sv, marker=".", color=colour, lw=1)
        ax.set(title=f"σ_k(ΔW), {kind} (layer 0 purple .. {top} yellow)", xlabel="k", yscale="log")
    return _save(fig, path, model)


def plot_layers(
    path: Path, modules: dict, other: dict | None = None, model: str | None = None
) -> Path:
    """Rank utilisation, stable rank / r and amplification per layer, a line per module role."""
    from matplotlib import colormaps

    fig, axes = _figure(3)
    panels = [
        ("rank utilisation (effective rank / r)", lambda m: m["rank_utilisation"]),
        ("stable rank / r", lambda m: m["stable_rank"] / m["r"]),
        ("amplification ‖ΔW‖_F / ‖UᵀWV‖_F", lambda m: m["amplification"]["amplification"]),
    ]
    for ax, (title, value) in zip(axes, panels, strict=True):
        for n, (role, (x, y)) in enumerate(_series(modules, value).items()):
            colour = colormaps["tab10"](n % 10)
            ax.plot(x, y, "-", marker=".", color=colour, label=role)
            if other is not None and role in (o := _series(other, value)):
                ax.plot(*o[role], "--", marker=".", color=colour, alpha=0.7)
        _layer_axis(
            ax, title + ("\n(dashed: the --compare run)" if other else ""), legend=ax is axes[0]
        )
    # DoRA's dense ΔW can use more than r directions: its utilisation may pass 1.
    shown = [*modules.values(), *(other or {}).values()]
    top = max((m["rank_utilisation"] for m in shown), default=1.0)
    axes[0].set_ylim(0, max(1.05, 1.05 * top))
    return _save(fig, path, model)


def plot_cka(path: Path, reps: dict, model: str | None = None) -> Path:
    """Linear CKA and median paired cosine per layer, per pair of models and pooling."""
    fig, axes = _figure(2, width=6.0)
    for ax, key, title in (
        (axes[0], "cka", "linear CKA per layer"),
        (axes[1], "cosine_median", "median paired cosine per layer"),
    ):
        for pair, by_pool in reps[key].items():
            for pool, values in by_pool.items():
                style = "-" if pool == "mean" else ":"
                label = f"{pair.replace('_', ' ')} ({pool})"
                ax.plot(range(len(values)), values, style, marker=".", label=label)
        _layer_axis(ax, title)
        ax.set(xlabel="hidden state index (0 = embeddings)")
    return _save(fig, path, model)


def plot_similarity(path: Path, sim: dict, names: list[str], data: dict) -> Path:
    """φ(i, j) heat-maps for the chosen modules (row 1: A, as in the paper; row 2: ΔW's output
    directions), and φ(1, 1) per layer per module role."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4.4 * (len(names) + 1), 7.2), layout="constrained")
    grid = fig.subplots(2, len(names) + 1, squeeze=False)
    r1, r2 = data["lora"]["r"], data["compare"]["lora"]["r"]
    rows = (("phi", "A: right-singular vectors"), ("phi_out", "ΔW: left-singular vectors"))
    for axes, (key, what) in zip(grid, rows, strict=True):
        for ax, name in zip(axes[:-1], names, strict=True):
            phi = sim[name][key]
            extent = (0.5, len(phi[0]) + 0.5, len(phi) + 0.5, 0.5)
            im = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", extent=extent)
            ax.set(title=f"φ(i, j) of {what}\n{name.removeprefix('model.')}")
            ax.set(xlabel=f"j (compare, r={r2})", ylabel=f"i (this run, r={r1})")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.colorbar(im, ax=ax, shrink=0.8)
        ax = axes[-1]
        for n, (role, (x, y)) in enumerate(_series(sim, lambda m, k=key: m[f"{k}_top1"]).items()):
            ax.plot(x, y, marker=".", color=colormaps["tab10"](n % 10), label=role)
        chance = mean(m[f"{key}_top1_random"] for m in sim.values())
        ax.axhline(chance, color="grey", ls=":", label="random directions")
        _layer_axis(ax, f"φ(1, 1) of {what.split(':')[0]} per layer")
        ax.set_ylim(0, 1.02)
    return _save(fig, path, data.get("model"))
