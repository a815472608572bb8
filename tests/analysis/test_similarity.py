"""Subspace similarity φ between two adapters (LoRA paper, section 7.2)."""

from __future__ import annotations

import pytest
import torch

from loralab import analysis as an


def _orthonormal(d, k, g):
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def test_similarity_of_an_adapter_with_itself_is_one_on_the_diagonal():
    A = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    phi = an.adapter_similarity(A, A)
    assert phi.shape == (8, 8)
    torch.testing.assert_close(torch.diagonal(phi), torch.ones(8, dtype=torch.float64))
    assert float(phi.min()) >= 0 and float(phi.max()) <= 1 + 1e-9
    # A lower-rank copy of the same top directions is contained: φ = 1 up to the smaller rank.
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    phi4 = an.adapter_similarity(A, Vh[:4] * S[:4, None])
    torch.testing.assert_close(phi4, torch.ones(8, 4, dtype=torch.float64))


def test_output_similarity_sees_the_learned_directions_of_b():
    g = torch.Generator().manual_seed(8)
    A1, A2 = torch.randn(4, 32, generator=g), torch.randn(6, 32, generator=g)
    B1 = torch.randn(20, 4, generator=g)
    B2 = torch.cat([B1, torch.randn(20, 2, generator=g)], 1)  # column space of B2 ⊇ that of B1
    phi = an.output_similarity(A1, B1, A2, B2)
    assert phi.shape == (4, 6)
    assert float(phi[3, 5]) == pytest.approx(1.0)  # ΔW1's 4 output directions lie in ΔW2's 6
    torch.testing.assert_close(
        torch.diagonal(an.output_similarity(A1, B1, A1, B1)), torch.ones(4, dtype=torch.float64)
    )


def test_similarity_of_random_subspaces_matches_its_expectation():
    d, r1, r2, trials = 64, 8, 6, 400
    g = torch.Generator().manual_seed(5)
    mean = (
        sum(
            an.subspace_similarity(_orthonormal(d, r1, g), _orthonormal(d, r2, g))
            for _ in range(trials)
        )
        / trials
    )
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    expected = i * j / (d * torch.minimum(i, j))
    torch.testing.assert_close(mean, expected, rtol=0.1, atol=0.004)


def test_orthogonal_subspaces_have_zero_similarity():
    eye = torch.eye(10, dtype=torch.float64)
    assert float(an.subspace_similarity(eye[:, :3], eye[:, 3:7]).abs().max()) == 0.0
