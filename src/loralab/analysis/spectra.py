"""The spectrum of ΔW = s·B·A and the statistics read from it (norms, effective/stable ranks).

Singular values and vectors come from the r×r problem (QR of Bᵀ and of Aᵀ), never from a dense
SVD of the out×in matrix, except for a variant whose update is not low-rank (DoRA): its dense
ΔW (`LoraFactors.delta`) is decomposed as it is.
"""

from __future__ import annotations

import torch

from .factors import LoraFactors


def delta_svd(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0):
    """Thin SVD of ΔW = s·B·A from the factors: U [out, r], S [r] (descending), V [in, r], fp64.

    B = Q_B R_B and Aᵀ = Q_A R_A give B A = Q_B (R_B R_Aᵀ) Q_Aᵀ: only the r×r core is decomposed.
    """
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    U = qb @ uc if scaling >= 0 else -(qb @ uc)
    return U, abs(scaling) * s, qa @ vch.T


def delta_singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values of s·B·A (descending, length r) via the r×r core R_B·R_Aᵀ."""
    _, rb = torch.linalg.qr(B.double())  # B = Q_B R_B
    _, ra = torch.linalg.qr(A.double().T)  # Aᵀ = Q_A R_A  ->  B A = Q_B (R_B R_Aᵀ) Q_Aᵀ
    return (abs(scaling) * torch.linalg.svdvals(rb @ ra.T)).float()


def update_svd(f: LoraFactors):
    """U [out, k], S [k] (descending), V [in, k] of the module's update, fp64: from the factors
    (k = r), or from the dense ΔW of a DoRA module (k = min(out, in))."""
    if f.delta is None:
        return delta_svd(f.A, f.B, f.scaling)
    U, S, Vh = torch.linalg.svd(f.delta.double(), full_matrices=False)
    return U, S, Vh.T


def update_singular_values(f: LoraFactors) -> torch.Tensor:
    """Singular values of the module's update (descending): r of them, or min(out, in) (DoRA)."""
    if f.delta is None:
        return delta_singular_values(f.A, f.B, f.scaling)
    return torch.linalg.svdvals(f.delta.double()).float()


def effective_rank(sv: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised singular values (Roy & Vetterli, 2007)."""
    total = sv.sum()
    if total <= 0:
        return 0.0
    p = sv / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(sv: torch.Tensor) -> float:
    """‖ΔW‖_F² / ‖ΔW‖_2²."""
    top = sv.max() if sv.numel() else torch.tensor(0.0)
    return float((sv**2).sum() / top**2) if top > 0 else 0.0


def numerical_rank(sv: torch.Tensor, rtol: float = 1e-4) -> int:
    """Number of singular values above rtol·σ_max (fp32 factors: below ~1e-6 is round-off)."""
    top = sv.max() if sv.numel() else torch.tensor(0.0)
    return int((sv > rtol * top).sum()) if top > 0 else 0


def module_stats(f: LoraFactors) -> dict[str, float]:
    """Cheap per-module statistics: norms/mean/std of A, B, ΔW; spectrum-based ranks.

    Rank utilisation is effective rank / r (the adapter's rank); a dense DoRA update may use
    more directions than r (the magnitude rescales W's rows), so it can exceed 1.
    """
    sv = update_singular_values(f)
    r = f.A.shape[0]
    fro_delta = float(torch.sqrt((sv.double() ** 2).sum()))
    n_delta = f.A.shape[1] * f.B.shape[0]
    # mean(ΔW) = s·(1ᵀB)(A1)/n is cheap; std follows from ‖ΔW‖_F² = n(mean² + var).
    if f.delta is None:
        mean_delta = float(f.scaling * (f.B.sum(0) @ f.A.sum(1)) / n_delta)
    else:
        mean_delta = float(f.delta.mean())
    var_delta = max(fro_delta**2 / n_delta - mean_delta**2, 0.0)
    eff = effective_rank(sv)
    return {
        "A_norm": float(f.A.norm()),
        "A_mean": float(f.A.mean()),
        "A_std": float(f.A.std()),
        "B_norm": float(f.B.norm()),
        "B_mean": float(f.B.mean()),
        "B_std": float(f.B.std()),
        "delta_fro_norm": fro_delta,
        "delta_spectral_norm": float(sv[0]) if sv.numel() else 0.0,
        "delta_mean": mean_delta,
        "delta_std": var_delta**0.5,
        "effective_rank": eff,
        "rank_utilisation": eff / r,
        "stable_rank": stable_rank(sv),
        "numerical_rank": numerical_rank(sv),
    }
