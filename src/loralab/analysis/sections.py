"""The parts of analysis.json, built from factors and pooled hidden states, and the terminal
summary read back from it. Pure: no run directory, no model loading."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from ..config import ExperimentConfig
from ..errors import LoralabError
from ..rundir import ANALYSIS_DIR
from .amplification import amplification
from .factors import LoraFactors
from .modules import kind_means, module_kind, module_layer, module_role
from .representations import cka_per_layer, median_cosine_per_layer
from .similarity import adapter_similarity, output_similarity
from .spectra import delta_singular_values, module_stats

# Means per module kind in `by_kind` (module statistics, then the amplification's).
KIND_STATS = ("rank_utilisation", "effective_rank", "stable_rank", "numerical_rank",
              "delta_fro_norm")  # fmt: skip
KIND_AMPLIFICATION = ("amplification", "proj_delta", "proj_top", "proj_random")
KIND_SIMILARITY = ("phi_top1", "phi_top1_random", "phi_out_top1", "phi_out_top1_random",
                   "phi_min_rank")  # fmt: skip


def module_report(factors: list[LoraFactors]) -> tuple[dict, dict]:
    """Per-module statistics + amplification (factors need W), and their means per module kind."""
    modules = {}
    for f in factors:
        sv = delta_singular_values(f.A, f.B, f.scaling)
        modules[f.name] = {
            "kind": module_kind(f.name),
            "layer": module_layer(f.name),
            "role": module_role(f.name),
            "r": f.A.shape[0],
            "shape": [f.B.shape[0], f.A.shape[1]],
            "singular_values": sv.tolist(),
            **module_stats(f),
            "amplification": amplification(f.W, f.A, f.B, f.scaling),
        }
    rows = [
        (name, {**{k: m[k] for k in KIND_STATS},
                **{k: m["amplification"][k] for k in KIND_AMPLIFICATION}})
        for name, m in modules.items()
    ]  # fmt: skip
    counts = Counter(m["kind"] for m in modules.values())
    by_kind = {
        kind: {"modules": counts[kind], **means}
        for kind, means in kind_means(rows, KIND_STATS + KIND_AMPLIFICATION).items()
    }
    return modules, by_kind


def heatmap_modules(names: list[str], layer: int | None) -> tuple[int | None, list[str]]:
    """q and v (else every kind) of the given layer, by default the middle adapted layer."""
    layers = sorted({module_layer(n) for n in names} - {None})
    if layer is None:
        layer = layers[len(layers) // 2] if layers else None
    elif layer not in layers:
        raise LoralabError(f"--layer {layer} has no adapted modules; adapted layers: {layers}.")
    at = [n for n in names if module_layer(n) == layer]
    qv = [n for n in at if module_kind(n) in ("q", "v")]
    return layer, qv or at


def compare_report(f1: list[LoraFactors], f2: list[LoraFactors]) -> tuple[dict, dict]:
    """φ per module over A's right-singular vectors (the paper's) and ΔW's output directions."""
    other = {f.name: f for f in f2}
    modules = {}
    for f in f1:
        g = other[f.name]
        phi = adapter_similarity(f.A, g.A)  # [r1, r2]
        phi_out = output_similarity(f.A, f.B, g.A, g.B)  # [r1, r2]
        k = min(phi.shape)
        modules[f.name] = {
            "kind": module_kind(f.name),
            "layer": module_layer(f.name),
            "phi": phi.tolist(),
            "phi_top1": float(phi[0, 0]),
            "phi_diag": [float(phi[i, i]) for i in range(k)],
            # E φ(1,1) for two random directions in R^d: the chance level to read φ against.
            "phi_top1_random": 1.0 / f.A.shape[1],
            "phi_out": phi_out.tolist(),
            "phi_out_top1": float(phi_out[0, 0]),
            "phi_out_top1_random": 1.0 / f.B.shape[0],
        }
    rows = [(name, {**m, "phi_min_rank": m["phi_diag"][-1]}) for name, m in modules.items()]
    return modules, kind_means(rows, KIND_SIMILARITY)


def lora_info(cfg: ExperimentConfig, factors: list[LoraFactors]) -> dict:
    """The adapter's rank(s), alpha, scaling, target, seed and number of adapted modules."""
    ranks = sorted({f.A.shape[0] for f in factors})
    return {
        "r": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": cfg.lora.alpha,
        "scaling": factors[0].scaling if factors else None,
        "target": cfg.lora.target,
        "seed": cfg.train.seed,
        "modules": len(factors),
    }


def representations(probe: int, pairs: dict, causal: bool, hidden_file: str) -> dict:
    """CKA and median cosine per layer for each pair of models.

    `pairs`: {"base_vs_adapted": (H1, H2), ...} with H = {"mean" | "token": [L+1, n, d]}.
    """
    first = next(iter(pairs.values()))[0]
    n_layers, n_probe = first["mean"].shape[:2]
    return {
        "probe": probe,
        "features": n_probe,
        "split": "eval (first N examples of the dev set)",
        "hidden_states_per_model": n_layers,
        "pooling": {
            "mean": "mean over real tokens",
            "token": "last real token" if causal else "first token",
        },
        "cka": {p: {k: cka_per_layer(x[k], y[k]) for k in x} for p, (x, y) in pairs.items()},
        "cosine_median": {
            p: {k: median_cosine_per_layer(x[k], y[k]) for k in x} for p, (x, y) in pairs.items()
        },
        "hidden_states_file": hidden_file,
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
