"""Layer-wise representations: linear CKA and the median paired cosine."""

from __future__ import annotations

import pytest
import torch

from loralab import analysis as an


def _orthonormal(d, k, g):
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def test_cka_identity_and_invariances():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(40, 16, generator=g, dtype=torch.float64)
    Q = _orthonormal(16, 16, g)
    assert an.linear_cka(X, X) == pytest.approx(1.0)
    assert an.linear_cka(X, 3.7 * X @ Q) == pytest.approx(1.0)
    assert an.linear_cka(X, X + 5.0) == pytest.approx(1.0)  # centring removes offsets
    assert an.linear_cka(X, 0.2 * X @ Q + 1.0) == pytest.approx(1.0)
    # Not invariant to an anisotropic scaling, and small for unrelated representations.
    scale = torch.ones(16, dtype=torch.float64)
    scale[:2] = 20
    assert an.linear_cka(X, X * scale) < 0.9
    assert an.linear_cka(X, torch.randn(40, 16, generator=g, dtype=torch.float64)) < 0.6


def test_median_cosine_ignores_a_few_high_norm_examples_that_dominate_cka():
    g = torch.Generator().manual_seed(9)
    X = torch.randn(2, 50, 16, generator=g, dtype=torch.float64)  # [layers, n, d]
    Y = X.clone()
    Y[1, 0] *= -40.0  # one example flips and blows up in layer 1
    cos = an.median_cosine_per_layer(X, Y)
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(1.0)
    cka = an.cka_per_layer(X, Y)
    assert cka[0] == pytest.approx(1.0) and cka[1] < 0.5


def test_cka_is_symmetric_and_accepts_different_widths():
    g = torch.Generator().manual_seed(7)
    X, Y = torch.randn(30, 8, generator=g), torch.randn(30, 20, generator=g)
    assert an.linear_cka(X, Y) == pytest.approx(an.linear_cka(Y, X))
