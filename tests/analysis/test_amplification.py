"""The amplification factor of ΔW against W (LoRA paper, section 7.3)."""

from __future__ import annotations

import math

import pytest
import torch

from loralab import analysis as an


def test_amplification_on_a_constructed_case():
    W = torch.arange(36, dtype=torch.float64).reshape(6, 6) / 10
    # ΔW = s·B·A acts only on inputs e1, e2 and outputs e3, e4, with singular values 3 and 2.
    A = torch.zeros(2, 6)
    A[0, 1], A[1, 2] = 1.5, 1.0
    B = torch.zeros(6, 2)
    B[3, 0], B[4, 1] = 1.0, 1.0
    out = an.amplification(W, A, B, scaling=2.0)
    hand_proj = float(W[3:5, 1:3].norm())  # ‖Uᵀ W V‖_F: rows {3, 4}, columns {1, 2} of W
    assert out["delta_fro_norm"] == pytest.approx(math.sqrt(3.0**2 + 2.0**2))
    assert out["proj_delta"] == pytest.approx(hand_proj)
    assert out["amplification"] == pytest.approx(math.sqrt(13.0) / hand_proj)
    top2 = torch.linalg.svdvals(W)[:2]
    assert out["proj_top"] == pytest.approx(float(top2.norm()))
    assert 0 < out["proj_random"] < out["proj_top"]


def test_amplification_of_a_zero_projection_is_infinite():
    W = torch.zeros(4, 4)
    W[0, 0] = 1.0
    A = torch.zeros(1, 4)
    A[0, 3] = 1.0
    B = torch.zeros(4, 1)
    B[2, 0] = 1.0
    assert math.isinf(an.amplification(W, A, B)["amplification"])
