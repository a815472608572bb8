"""ΔW against W: the amplification factor (LoRA paper, Hu et al. 2021, section 7.3, Table 7)."""

from __future__ import annotations

import math

import torch

from .spectra import delta_svd


def _random_orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q


def amplification(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float = 1.0,
    n_random: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """How much ΔW amplifies directions that W already has, W: [out, in], A: [r, in], B: [out, r].

    With U [out, r], V [in, r] the top-r singular vectors of ΔW: proj_delta = ‖Uᵀ W V‖_F and
    amplification = ‖ΔW‖_F / proj_delta. References: W projected onto its own top-r directions
    (proj_top = sqrt of the sum of its r largest σ²) and onto random r-dim subspaces (proj_random,
    mean over n_random draws). A large amplification with proj_delta ≪ proj_top means that ΔW
    boosts directions that W holds but does not emphasise.
    """
    return svd_amplification(W, *delta_svd(A, B, scaling), A.shape[0], n_random, seed)


def svd_amplification(
    W: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    r: int,
    n_random: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """`amplification` from ΔW's SVD: U [out, k], S [k] (all of ΔW's singular values), V [in, k].

    The projection uses the top-r directions (k ≥ r); ‖ΔW‖_F all of S (a dense DoRA update).
    """
    U, V = U[:, :r], V[:, :r]
    W = W.double()
    delta_fro = float(torch.sqrt((S**2).sum()))
    proj_delta = float(torch.linalg.matrix_norm(U.T @ W @ V))
    sw = torch.linalg.svdvals(W)
    proj_top = float(torch.sqrt((sw[:r] ** 2).sum()))
    g = torch.Generator().manual_seed(seed)
    rand = [
        float(
            torch.linalg.matrix_norm(
                _random_orthonormal(W.shape[0], r, g).T @ W @ _random_orthonormal(W.shape[1], r, g)
            )
        )
        for _ in range(n_random)
    ]
    return {
        "delta_fro_norm": delta_fro,
        "proj_delta": proj_delta,
        "amplification": delta_fro / proj_delta if proj_delta > 0 else math.inf,
        "proj_top": proj_top,
        "proj_random": sum(rand) / len(rand) if rand else math.nan,
        "W_fro_norm": float(torch.linalg.matrix_norm(W)),
    }
