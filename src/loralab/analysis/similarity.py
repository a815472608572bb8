"""Between two adapters: subspace similarity φ (LoRA paper, Hu et al. 2021, section 7.2)."""

from __future__ import annotations

import torch

from .spectra import delta_svd


def right_singular_vectors(A: torch.Tensor) -> torch.Tensor:
    """Right-singular vectors of A [r, in] as columns [in, r], by descending singular value."""
    _, _, vh = torch.linalg.svd(A.double(), full_matrices=False)
    return vh.T


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """φ[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) for orthonormal U1 [d, r1], U2 [d, r2].

    1 when one top subspace contains the other, 0 when they are orthogonal; for random
    subspaces of R^d its expectation is i·j / (d·min(i, j)). Returns [r1, r2], fp64.
    """
    overlap = (U1.double().T @ U2.double()) ** 2  # [r1, r2]
    cum = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, U1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, U2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def adapter_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(A1, A2, i, j) over the right-singular directions of A1 [r1, in] and A2 [r2, in]: [r1, r2]."""
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A factors live in different input spaces: {A1.shape[1]} vs {A2.shape[1]}"
        )
    return subspace_similarity(right_singular_vectors(A1), right_singular_vectors(A2))


def output_similarity(A1, B1, A2, B2) -> torch.Tensor:
    """φ over the left-singular vectors of ΔW₁ = B₁A₁ and ΔW₂ = B₂A₂ (output space): [r1, r2].

    A complement to `adapter_similarity`: A starts from a random init and, in a short run, its
    row space stays close to it, while B starts at zero, so ΔW's output directions are all learned.
    """
    if B1.shape[0] != B2.shape[0]:
        raise ValueError(
            f"B factors live in different output spaces: {B1.shape[0]} vs {B2.shape[0]}"
        )
    return subspace_similarity(delta_svd(A1, B1)[0], delta_svd(A2, B2)[0])
