"""The parts of analysis.json, built from factors and pooled hidden states, and the terminal
summary read back from it. Pure: no run directory, no model loading."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from .. import residual
from ..config import ExperimentConfig
from ..errors import LoralabError
from ..models import caveat
from ..rundir import ANALYSIS_DIR
from .amplification import amplification, svd_amplification
from .factors import UPDATES, LoraFactors
from .modules import kind_means, module_kind, module_layer, module_role
from .representations import cka_per_layer, median_cosine_per_layer
from .similarity import adapter_similarity, output_similarity, subspace_similarity
from .spectra import module_stats, update_singular_values, update_svd

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
        sv = update_singular_values(f)
        modules[f.name] = {
            "kind": module_kind(f.name),
            "layer": module_layer(f.name),
            "role": module_role(f.name),
            "r": f.A.shape[0],
            "shape": [f.B.shape[0], f.A.shape[1]],
            "update": "factors" if f.delta is None else "dense",
            "singular_values": sv.tolist(),
            **module_stats(f),
            "amplification": _amplification(f),
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


def _amplification(f: LoraFactors) -> dict[str, float]:
    if f.delta is None:  # the r×r route, as it always was
        return amplification(f.W, f.A, f.B, f.scaling)
    return svd_amplification(f.W, *update_svd(f), f.A.shape[0])


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
        phi_out = _output_similarity(f, g)  # [r1, r2]
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


def _output_similarity(f: LoraFactors, g: LoraFactors) -> torch.Tensor:
    """φ over ΔW's top-r left-singular vectors (the dense update's for DoRA): [r1, r2]."""
    if f.delta is None and g.delta is None:
        return output_similarity(f.A, f.B, g.A, g.B)
    U1, U2 = update_svd(f)[0][:, : f.A.shape[0]], update_svd(g)[0][:, : g.A.shape[0]]
    return subspace_similarity(U1, U2)


def lora_info(cfg: ExperimentConfig, factors: list[LoraFactors]) -> dict:
    """The adapter's rank(s), alpha, scaling, target, seed and number of adapted modules."""
    ranks = sorted({f.A.shape[0] for f in factors})
    variant = factors[0].variant if factors else "lora"
    info = {
        "r": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": cfg.lora.alpha,
        "scaling": factors[0].scaling if factors else None,
        "target": cfg.lora.target,
        "seed": cfg.train.seed,
        "modules": len(factors),
        "variant": variant_name(cfg),
        "update": UPDATES[variant],
    }
    if residual.converts(cfg.lora.init_lora_weights):
        info["update"] += (
            f"; {cfg.lora.init_lora_weights} initialisation: the saved adapter is the update "
            "relative to the pretrained weight, s·(B·A − B₀·A₀) = s·[B | −B₀]·[A; A₀], of "
            f"rank 2r = {2 * cfg.lora.r} (A, B statistics are of these stacked factors)"
        )
    return info


def variant_name(cfg: ExperimentConfig) -> str:
    """The LoRA variant in words: 'lora', or e.g. 'dora+rslora+init=pissa+lora+16'."""
    lo = cfg.lora
    parts = [name for name, on in (("dora", lo.use_dora), ("rslora", lo.use_rslora)) if on]
    if lo.init_lora_weights is not True:
        parts.append(f"init={lo.init_lora_weights}")
    if lo.loraplus_lr_ratio is not None:
        parts.append(f"lora+{lo.loraplus_lr_ratio:g}")
    return "+".join(parts) or "lora"


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
    if note := caveat(data.get("model") or ""):
        lines.append(f"  ({note})")
    if lora.get("variant", "lora") != "lora":
        lines.append(f"  variant {lora['variant']}: {lora['update']}")
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
