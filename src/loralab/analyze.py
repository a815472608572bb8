"""`loralab analyze`: look inside a trained adapter (and compare it with a second one).

Loads run directories, the probe set and the models; the numbers come from the pure functions
in `analysis.py`. Writes `analysis/` in the run directory: analysis.json, PNG plots and the
probe set's hidden states (safetensors). The JSON schema is documented in the README.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import analysis as an
from . import tracking
from .config import ExperimentConfig
from .errors import LoralabError
from .runs import load_adapter_model, open_lora_run

ANALYSIS_DIR = "analysis"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HIDDEN_FILE = "hidden_states.safetensors"
SCHEMA_VERSION = 1
DEFAULT_PROBE = 256


@dataclass
class AnalysisResult:
    out_dir: Path
    data: dict
    summary: str


def _open_adapter_run(
    path: str | Path, trust_remote_code: bool = False
) -> tuple[Path, ExperimentConfig, set[str]]:
    """Run dir, its config and the names of its adapted modules (from the weight file's keys)."""
    from safetensors import safe_open

    run_dir, cfg = open_lora_run(path, "analyze", trust_remote_code)
    weights = run_dir / tracking.ADAPTER_DIR / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LoralabError(
            f"'{run_dir}' has no {tracking.ADAPTER_DIR}/{ADAPTER_WEIGHTS} to analyze."
        )
    with safe_open(str(weights), "pt") as fh:
        keys = list(fh.keys())
    suffix = ".lora_A.weight"
    modules = {an._short_name(k[: -len(suffix)]) for k in keys if k.endswith(suffix)}
    return run_dir, cfg, modules


def _check_comparable(cfg1, mods1, dir2, cfg2, mods2) -> None:
    if cfg1.model.name != cfg2.model.name:
        raise LoralabError(
            f"The two adapters sit on different base models ('{cfg1.model.name}' vs "
            f"'{cfg2.model.name}' in '{dir2}'); subspaces and representations are only "
            "comparable on the same base model."
        )
    if mods1 != mods2:
        only1, only2 = sorted(mods1 - mods2), sorted(mods2 - mods1)
        raise LoralabError(
            f"The two adapters adapt different modules (only in the first: {only1[:4]}"
            f"{' ...' if len(only1) > 4 else ''}; only in '{dir2}': {only2[:4]}"
            f"{' ...' if len(only2) > 4 else ''}). Compare runs trained with the same lora.target."
        )


def _load_peft(cfg: ExperimentConfig, task, run_dir: Path):
    return load_adapter_model(cfg, task, run_dir)


def _probe_examples(cfg: ExperimentConfig, task, n: int, data_dir, eval_file):
    """The first n examples of the run's dev split (checked before any model is loaded)."""
    try:
        raw = task.load("eval", data_dir or cfg.data.data_dir, eval_file or cfg.data.eval_file)
    except LoralabError as e:
        raise LoralabError(
            f"{e} (The probe set is the run's dev split; point --data-dir/--eval-file at it.)"
        ) from e
    if n is None:  # as much as the run evaluated on, at most 256
        n = min(DEFAULT_PROBE, len(raw), cfg.data.max_eval_examples or len(raw))
    if n < 2 or n > len(raw):
        raise LoralabError(
            f"--probe {n} is out of range: the probe set takes the first N examples of the dev "
            f"split, which has {len(raw)}; use 2 <= N <= {len(raw)}."
        )
    return raw.select(range(n))


def _probe_batches(cfg: ExperimentConfig, task, raw, tokenizer, causal: bool, batch_size=32):
    """Padded batches of the probe examples (right padding, original order); `--head lm` runs
    see their prompts, as in training."""
    max_length = cfg.data.max_length or task.default_max_length
    if cfg.model.head == "lm":
        from . import lm

        prompting = lm.prompting_for(task, cfg.data, tokenizer)
        feats = lm.featurize(task, raw, tokenizer, max_length, "eval", prompting)
    else:
        feats = task.featurize(raw, tokenizer, max_length, cfg.data.doc_stride, "eval", causal)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in feats.column_names]
    rows = [{c: feats[i][c] for c in cols} for i in range(len(feats))]
    return [
        tokenizer.pad(rows[i : i + batch_size], return_tensors="pt")
        for i in range(0, len(rows), batch_size)
    ]


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _module_report(factors: list[an.LoraFactors]) -> tuple[dict, dict]:
    """Per-module statistics + amplification, and their means per module kind."""
    modules = {}
    for f in factors:
        sv = an.delta_singular_values(f.A, f.B, f.scaling)
        modules[f.name] = {
            "kind": an.module_kind(f.name),
            "layer": an.module_layer(f.name),
            "role": an.module_role(f.name),
            "r": f.A.shape[0],
            "shape": [f.B.shape[0], f.A.shape[1]],
            "singular_values": sv.tolist(),
            **an.module_stats(f),
            "amplification": an.amplification(f.W, f.A, f.B, f.scaling),
        }
    by_kind: dict[str, dict] = {}
    for kind in dict.fromkeys(m["kind"] for m in modules.values()):
        ms = [m for m in modules.values() if m["kind"] == kind]
        agg = {"modules": len(ms)}
        for key in (
            "rank_utilisation",
            "effective_rank",
            "stable_rank",
            "numerical_rank",
            "delta_fro_norm",
        ):
            agg[key] = _mean(m[key] for m in ms)
        for key in ("amplification", "proj_delta", "proj_top", "proj_random"):
            agg[key] = _mean(m["amplification"][key] for m in ms)
        by_kind[kind] = agg
    return modules, by_kind


def _heatmap_modules(names: list[str], layer: int | None) -> tuple[int | None, list[str]]:
    """q and v (else every kind) of the given layer, by default the middle adapted layer."""
    layers = sorted({an.module_layer(n) for n in names} - {None})
    if layer is None:
        layer = layers[len(layers) // 2] if layers else None
    elif layer not in layers:
        raise LoralabError(f"--layer {layer} has no adapted modules; adapted layers: {layers}.")
    at = [n for n in names if an.module_layer(n) == layer]
    qv = [n for n in at if an.module_kind(n) in ("q", "v")]
    return layer, qv or at


def _compare_report(f1: list[an.LoraFactors], f2: list[an.LoraFactors]) -> tuple[dict, dict]:
    """φ per module over A's right-singular vectors (the paper's) and ΔW's output directions."""
    other = {f.name: f for f in f2}
    modules = {}
    for f in f1:
        g = other[f.name]
        phi = an.adapter_similarity(f.A, g.A)
        phi_out = an.output_similarity(f.A, f.B, g.A, g.B)
        k = min(phi.shape)
        modules[f.name] = {
            "kind": an.module_kind(f.name),
            "layer": an.module_layer(f.name),
            "phi": phi.tolist(),
            "phi_top1": float(phi[0, 0]),
            "phi_diag": [float(phi[i, i]) for i in range(k)],
            # E φ(1,1) for two random directions in R^d: the chance level to read φ against.
            "phi_top1_random": 1.0 / f.A.shape[1],
            "phi_out": phi_out.tolist(),
            "phi_out_top1": float(phi_out[0, 0]),
            "phi_out_top1_random": 1.0 / f.B.shape[0],
        }
    by_kind = {}
    for kind in dict.fromkeys(m["kind"] for m in modules.values()):
        ms = [m for m in modules.values() if m["kind"] == kind]
        by_kind[kind] = {
            key: _mean(m[key] for m in ms)
            for key in ("phi_top1", "phi_top1_random", "phi_out_top1", "phi_out_top1_random")
        }
        by_kind[kind]["phi_min_rank"] = _mean(m["phi_diag"][-1] for m in ms)
    return modules, by_kind


def _check_variant(run_dir: Path, cfg) -> None:
    why = an.unsupported_variant(cfg.lora)
    if why:
        raise LoralabError(
            f"Run '{run_dir}' uses a LoRA variant the adapter analysis does not cover yet: {why}. "
            "Its statistics would be wrong, so none are written. Plain LoRA, rsLoRA and "
            "Gaussian-initialised adapters are supported."
        )


def analyze(
    run_dir: str | Path,
    compare: str | Path | None = None,
    probe: int | None = None,
    layer: int | None = None,
    data_dir: str | None = None,
    eval_file: str | None = None,
    trust_remote_code: bool = False,
) -> AnalysisResult:
    """Analyze one LoRA run (optionally against a second); write and return `analysis/`.

    `probe` None = min(256, dev size, the run's data.max_eval_examples). Remote code runs only
    with `trust_remote_code` (the command line), never because a run folder's config says so.
    """
    from .models import load_tokenizer
    from .tasks import get_task
    from .train import is_causal

    run_dir, cfg, mods = _open_adapter_run(run_dir, trust_remote_code)
    _check_variant(run_dir, cfg)
    tracking.check_writable(run_dir / ANALYSIS_DIR, "The analysis folder")
    other_dir = other_cfg = None
    if compare is not None:
        other_dir, other_cfg, other_mods = _open_adapter_run(compare, trust_remote_code)
        _check_variant(other_dir, other_cfg)
        _check_comparable(cfg, mods, other_dir, other_cfg, other_mods)
        _heatmap_modules(sorted(mods), layer)  # a bad --layer fails before the slow part
    task = get_task(cfg.data.task)
    examples = _probe_examples(cfg, task, probe, data_dir, eval_file)
    tokenizer = load_tokenizer(
        cfg.model.name, trust_remote_code=cfg.model.trust_remote_code, progress=False
    )
    tokenizer.padding_side = "right"  # pooling reads the last real token at mask.sum() - 1

    model = _load_peft(cfg, task, run_dir)
    causal = is_causal(model.config)
    batches = _probe_batches(cfg, task, examples, tokenizer, causal)
    factors = an.lora_factors(model, with_base=True)
    modules, by_kind = _module_report(factors)
    with model.disable_adapter():
        h_base = an.pooled_hidden_states(model, batches, causal)
    h_adapted = an.pooled_hidden_states(model, batches, causal)
    hidden = {f"base.{k}": v for k, v in h_base.items()} | {
        f"adapted.{k}": v for k, v in h_adapted.items()
    }
    pairs = {"base_vs_adapted": (h_base, h_adapted)}

    data = {
        "schema_version": SCHEMA_VERSION,
        "run_dir": str(run_dir),
        "model": cfg.model.name,
        "task": cfg.data.task,
        "lora": _lora_info(cfg, factors),
        "modules": modules,
        "by_kind": by_kind,
        "compare": None,
    }
    other_modules = None
    if other_dir is not None:
        del model  # keep a single full model in memory (factors hold only adapted weights)
        other = _load_peft(other_cfg, get_task(other_cfg.data.task), other_dir)
        f2 = an.lora_factors(other, with_base=True)
        other_modules, other_by_kind = _module_report(f2)
        sim, sim_by_kind = _compare_report(factors, f2)
        h_other = an.pooled_hidden_states(other, batches, causal)
        hidden |= {f"compare.{k}": v for k, v in h_other.items()}
        pairs |= {"base_vs_compare": (h_base, h_other), "adapted_vs_compare": (h_adapted, h_other)}
        heat_layer, heat_names = _heatmap_modules(list(sim), layer)
        data["compare"] = {
            "run_dir": str(other_dir),
            "task": other_cfg.data.task,
            "lora": _lora_info(other_cfg, f2),
            "by_kind": other_by_kind,
            "similarity": sim,
            "similarity_by_kind": sim_by_kind,
            "heatmap_layer": heat_layer,
            "heatmap_modules": heat_names,
        }
    n_layers, n_probe = h_base["mean"].shape[:2]
    data["representations"] = {
        "probe": len(examples),
        "features": n_probe,
        "split": "eval (first N examples of the dev set)",
        "hidden_states_per_model": n_layers,
        "pooling": {
            "mean": "mean over real tokens",
            "token": "last real token" if causal else "first token",
        },
        "cka": {p: {k: an.cka_per_layer(x[k], y[k]) for k in x} for p, (x, y) in pairs.items()},
        "cosine_median": {
            p: {k: an.median_cosine_per_layer(x[k], y[k]) for k in x} for p, (x, y) in pairs.items()
        },
        "hidden_states_file": HIDDEN_FILE,
    }

    final = _write(run_dir, data, hidden, other_modules)
    return AnalysisResult(final, data, format_summary(data))


def _write(run_dir: Path, data: dict, hidden: dict, other_modules: dict | None) -> Path:
    """Plots, hidden states and JSON into a temp folder that then replaces `analysis/` whole,
    so no stale plot from an earlier --compare survives and a crash leaves the old folder."""
    from safetensors.torch import save_file

    final = run_dir / ANALYSIS_DIR
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{ANALYSIS_DIR}.tmp-"))
    modules, comp = data["modules"], data["compare"]
    files = [
        plot_spectra(tmp / "spectra.png", modules),
        plot_layers(tmp / "rank_utilisation.png", modules, other_modules),
        plot_cka(tmp / "cka.png", data["representations"]),
    ]
    if comp is not None:
        png = tmp / f"similarity_layer{comp['heatmap_layer']}.png"
        files.append(plot_similarity(png, comp["similarity"], comp["heatmap_modules"], data))
    save_file({k: _compact(v) for k, v in hidden.items()}, str(tmp / HIDDEN_FILE))
    data["files"] = [p.name for p in files] + [HIDDEN_FILE, "analysis.json"]
    tracking.write_json(tmp / "analysis.json", data)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _compact(h: torch.Tensor) -> torch.Tensor:
    """fp16 halves the file (CKA is computed before, in fp64); fp32 if a value would overflow."""
    return (h.half() if h.abs().max() < 6e4 else h).contiguous()


def _lora_info(cfg: ExperimentConfig, factors: list[an.LoraFactors]) -> dict:
    ranks = sorted({f.A.shape[0] for f in factors})
    return {
        "r": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": cfg.lora.alpha,
        "scaling": factors[0].scaling if factors else None,
        "target": cfg.lora.target,
        "seed": cfg.train.seed,
        "modules": len(factors),
    }


def format_summary(data: dict) -> str:
    """A few lines for the terminal: rank use and amplification per kind, similarity, CKA."""
    lora = data["lora"]
    lines = [
        f"{data['run_dir']}: {lora['modules']} adapted modules, r={lora['r']}, alpha={lora['alpha']}"
    ]
    for kind, k in data["by_kind"].items():
        lines.append(
            f"  {kind:>4}: rank utilisation {k['rank_utilisation']:.2f} (effective rank "
            f"{k['effective_rank']:.2f}, stable rank {k['stable_rank']:.2f}), amplification "
            f"{k['amplification']:.1f} (‖ΔW‖_F {k['delta_fro_norm']:.3f}, ‖UᵀWV‖_F {k['proj_delta']:.3f}, "
            f"W top-r {k['proj_top']:.2f}, random {k['proj_random']:.3f})"
        )
    comp = data["compare"]
    if comp is not None:
        lines.append(
            f"  vs {comp['run_dir']} (r={comp['lora']['r']}, seed {comp['lora']['seed']}):"
        )
        for kind, k in comp["similarity_by_kind"].items():
            lines.append(
                f"  {kind:>4}: subspace similarity of A: φ(1,1) {k['phi_top1']:.3f} (random "
                f"{k['phi_top1_random']:.4f}), φ(k,k) at the smaller rank {k['phi_min_rank']:.3f}; "
                f"of ΔW's output directions: φ(1,1) {k['phi_out_top1']:.3f} (random {k['phi_out_top1_random']:.4f})"
            )
    reps = data["representations"]
    for pool, how in reps["pooling"].items():
        cka = [float(v) for v in reps["cka"]["base_vs_adapted"][pool]]  # JSON keeps NaN as "nan"
        cos = [float(v) for v in reps["cosine_median"]["base_vs_adapted"][pool]]
        # NaN where a layer is constant over the probe (e.g. the embedding of a shared last token)
        low = min(range(len(cka)), key=lambda i: cka[i] if math.isfinite(cka[i]) else math.inf)
        lines.append(
            f"  base vs adapted, {how}: linear CKA min {cka[low]:.3f} (hidden state {low}), "
            f"last {cka[-1]:.3f}; median cosine min {min(cos):.3f}, last {cos[-1]:.3f}"
        )
    lines.append(f"  wrote {Path(data['run_dir']) / ANALYSIS_DIR}/ ({', '.join(data['files'])})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, no display needed)


def _figure(ncols: int, width: float = 4.4, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _series(modules: dict, value) -> dict[str, tuple[list, list]]:
    """{role: (layers, values)}: one line per module role (q_proj, v_proj, ...) across layers."""
    out: dict[str, list] = {}
    for i, (name, m) in enumerate(modules.items()):
        layer = m["layer"] if m["layer"] is not None else i
        out.setdefault(an.module_role(name), []).append((layer, value(m)))
    return {k: ([p[0] for p in sorted(v)], [p[1] for p in sorted(v)]) for k, v in out.items()}


def _layer_axis(ax, title: str, legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend:
        ax.legend(fontsize=7)


def plot_spectra(path: Path, modules: dict) -> Path:
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
    fig.savefig(path, dpi=110)
    return path


def plot_layers(path: Path, modules: dict, other: dict | None = None) -> Path:
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
    axes[0].set_ylim(0, 1.05)
    fig.savefig(path, dpi=110)
    return path


def plot_cka(path: Path, reps: dict) -> Path:
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
    fig.savefig(path, dpi=110)
    return path


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
        chance = _mean(m[f"{key}_top1_random"] for m in sim.values())
        ax.axhline(chance, color="grey", ls=":", label="random directions")
        _layer_axis(ax, f"φ(1, 1) of {what.split(':')[0]} per layer")
        ax.set_ylim(0, 1.02)
    fig.savefig(path, dpi=110)
    return path
