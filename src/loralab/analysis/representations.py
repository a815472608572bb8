"""Layer-wise representations: pooled hidden states, linear CKA (Kornblith et al., 2019) and
the median paired cosine."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA between X [n, d1] and Y [n, d2] (rows = the same n examples).

    ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F) with column-centred Xc, Yc: 1 for X vs itself,
    invariant to orthogonal transforms and isotropic scaling, not to arbitrary linear maps.
    """
    X = X.double() - X.double().mean(0)
    Y = Y.double() - Y.double().mean(0)
    # n×n Gram matrices: probe sets are smaller than hidden sizes, and the result is the same.
    K, L = X @ X.T, Y @ Y.T
    denom = torch.linalg.matrix_norm(K) * torch.linalg.matrix_norm(L)
    return float((K * L).sum() / denom) if denom > 0 else math.nan


@torch.no_grad()
def pooled_hidden_states(model: nn.Module, batches, causal: bool) -> dict[str, torch.Tensor]:
    """Hidden states of every layer for a probe set, pooled per example.

    `batches` yields dicts with input_ids / attention_mask [b, t] (right padding). Returns
    {"mean": [L+1, n, d] mean over real tokens, "token": [L+1, n, d] the token a sequence head
    reads (last real token for causal models, the first otherwise)}; index 0 is the embeddings.
    """
    means, tokens = [], []
    for batch in batches:
        mask = batch["attention_mask"]
        out = model(**batch, output_hidden_states=True)
        hs = torch.stack(out.hidden_states).float()  # [L+1, b, t, d]
        m = mask[None, :, :, None].to(hs.dtype)
        means.append((hs * m).sum(2) / m.sum(2).clamp(min=1))
        pos = mask.sum(1) - 1 if causal else torch.zeros(mask.shape[0], dtype=torch.long)
        tokens.append(hs[:, torch.arange(mask.shape[0]), pos])
    return {"mean": torch.cat(means, 1), "token": torch.cat(tokens, 1)}


def cka_per_layer(H1: torch.Tensor, H2: torch.Tensor) -> list[float]:
    """Linear CKA layer by layer between two [L, n, d] stacks of pooled hidden states."""
    return [linear_cka(a, b) for a, b in zip(H1, H2, strict=True)]


def median_cosine_per_layer(H1: torch.Tensor, H2: torch.Tensor) -> list[float]:
    """Median over examples of cos(H1[l, i], H2[l, i]) per layer, for [L, n, d] stacks.

    Per-example drift, robust to the few high-norm examples (massive activations) that can
    dominate linear CKA.
    """
    cos = torch.nn.functional.cosine_similarity(H1.double(), H2.double(), dim=-1)  # [L, n]
    return cos.median(dim=1).values.tolist()
