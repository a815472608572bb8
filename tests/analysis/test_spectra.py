"""ΔW's spectrum from the factors: singular values, planted ranks, module statistics."""

from __future__ import annotations

import pytest
import torch

from loralab import analysis as an


def _planted(out=48, inp=40, r=8, k=3, seed=0):
    """A, B with rank(B A) = k: only k of the r rank-one terms are non-zero."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g)
    B = torch.randn(out, r, generator=g)
    B[:, k:] = 0
    return A, B


def test_factor_singular_values_equal_dense_svd():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(6, 50, generator=g), torch.randn(70, 6, generator=g)
    dense = torch.linalg.svdvals(2.5 * B.double() @ A.double())[:6]
    torch.testing.assert_close(
        an.delta_singular_values(A, B, 2.5).double(), dense, rtol=1e-5, atol=1e-6
    )
    U, S, V = an.delta_svd(A, B, 2.5)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, 2.5 * B.double() @ A.double())
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))


def test_planted_rank_is_recovered():
    A, B = _planted(k=3)
    sv = an.delta_singular_values(A, B, 2.0)
    assert an.numerical_rank(sv) == 3
    assert an.numerical_rank(sv) == int(torch.linalg.matrix_rank(B @ A))
    assert 1.0 < an.effective_rank(sv) <= 3.0 + 1e-5
    # Equal singular values: effective rank is exactly k, utilisation k / r.
    Q = torch.linalg.qr(torch.randn(40, 8, generator=torch.Generator().manual_seed(2)))[0]
    A_eq, B_eq = Q.T.clone(), torch.zeros(48, 8)
    B_eq[:3, :3] = torch.eye(3)
    stats = an.module_stats(an.LoraFactors("layers.0.q_proj", A_eq, B_eq, 1.0))
    assert stats["effective_rank"] == pytest.approx(3.0, abs=1e-5)
    assert stats["rank_utilisation"] == pytest.approx(3 / 8, abs=1e-5)
    assert stats["stable_rank"] == pytest.approx(3.0, abs=1e-5)
    assert stats["numerical_rank"] == 3


def test_module_stats_match_dense_delta():
    A, B = _planted(k=8, seed=3)
    f = an.LoraFactors("x", A, B, 0.5)
    dense = 0.5 * B.double() @ A.double()
    s = an.module_stats(f)
    assert s["delta_fro_norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
    assert s["delta_spectral_norm"] == pytest.approx(
        float(torch.linalg.matrix_norm(dense, 2)), rel=1e-5
    )
    assert s["delta_mean"] == pytest.approx(float(dense.mean()), abs=1e-6)
    assert s["delta_std"] == pytest.approx(float(dense.std(unbiased=False)), rel=1e-4)
