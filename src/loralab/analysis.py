"""Inside the adapters: pure functions on LoRA factors, weights and hidden states.

ΔW = s·B·A with A: [r, in], B: [out, r], s = alpha/r. Its singular values and vectors come from
the r×r problem (QR of Bᵀ and of Aᵀ), never from a dense SVD of the out×in matrix. The
subspace similarity and the amplification factor follow section 7 of the LoRA paper (Hu et al.,
2021); the representation comparison is linear CKA (Kornblith et al., 2019).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class LoraFactors:
    """One adapted module's factors, detached, in fp32 (W only when asked for)."""

    name: str
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float
    W: torch.Tensor | None = None  # [out, in], the frozen base weight


class UnsupportedVariant(ValueError):
    """The adapter is a LoRA variant whose update is not s·B·A on the stored base weight."""


# Initialisations that rewrite the base weight (PiSSA/OLoRA/CorDA keep a residual W − s·B₀A₀,
# LoftQ a quantised one): s·B·A alone is then not the learned update.
_RESIDUAL_INITS = ("pissa", "olora", "loftq", "corda", "eva")


def unsupported_variant(peft_config) -> str | None:
    """Why the factor analysis would be wrong for this `peft.LoraConfig`, or None if it is right."""
    if getattr(peft_config, "use_dora", False):
        return (
            "DoRA (use_dora) rescales every output row by a learned magnitude, so the update is "
            "not s·B·A"
        )
    init = getattr(peft_config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        return (
            f"init_lora_weights={init!r} replaces the base weight by a residual, so s·B·A is "
            "not the update to the original weight"
        )
    return None


def lora_factors(
    model: nn.Module, adapter: str = "default", with_base: bool = False, check_variant: bool = True
) -> list[LoraFactors]:
    """Every LoRA-wrapped layer of a PEFT model, in module order.

    Raises UnsupportedVariant for variants whose update is not s·B·A on the stored weight
    (DoRA, PiSSA-style residual initialisations): their numbers would be silently wrong.
    `check_variant=False` is for structural uses that only read the factors (counting layers,
    finding B = 0).
    """
    peft_config = getattr(model, "peft_config", {}).get(adapter) if check_variant else None
    why = unsupported_variant(peft_config) if peft_config is not None else None
    if why:
        raise UnsupportedVariant(f"The adapter analysis does not cover this adapter yet: {why}.")
    out = []
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, nn.ModuleDict) or adapter not in lora_A:
            continue
        A = lora_A[adapter].weight.detach().float()
        B = module.lora_B[adapter].weight.detach().float()
        scaling = float(module.scaling[adapter])
        W = _base_weight(module) if with_base else None
        out.append(LoraFactors(_short_name(name), A, B, scaling, W))
    return out


def _base_weight(module: nn.Module) -> torch.Tensor:
    W = module.get_base_layer().weight.detach().float()
    # GPT-2's Conv1D stores [in, out]; PEFT marks such layers with fan_in_fan_out.
    return W.T if getattr(module, "fan_in_fan_out", False) else W


def _short_name(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


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
    """Cheap per-module statistics: norms/mean/std of A, B, ΔW; spectrum-based ranks."""
    sv = delta_singular_values(f.A, f.B, f.scaling)
    r = f.A.shape[0]
    fro_delta = float(torch.sqrt((sv.double() ** 2).sum()))
    n_delta = f.A.shape[1] * f.B.shape[0]
    # mean(ΔW) = s·(1ᵀB)(A1)/n is cheap; std follows from ‖ΔW‖_F² = n(mean² + var).
    mean_delta = float(f.scaling * (f.B.sum(0) @ f.A.sum(1)) / n_delta)
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


def module_kind(name: str) -> str:
    """Coarse module type from its name: q / k / v / o / mlp / other."""
    leaf = name.split(".")[-1]
    table = {
        "q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
        "o_proj": "o", "c_attn": "qkv", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
        "c_fc": "mlp",
    }  # fmt: skip
    if leaf in table:
        return table[leaf]
    if name.endswith("attention.output.dense") or name.endswith("attn.c_proj"):
        return "o"
    if "intermediate" in name or "mlp" in name or name.endswith("output.dense"):
        return "mlp"
    return "other"


def module_layer(name: str) -> int | None:
    """Transformer block index from a module name ("model.layers.7.self_attn.q_proj" -> 7)."""
    m = re.search(r"\.(?:layers|layer|h|blocks)\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def module_role(name: str) -> str:
    """The module's name inside its block ("model.layers.7.self_attn.q_proj" -> "self_attn.q_proj")."""
    m = re.search(r"\.(?:layers|layer|h|blocks)\.\d+\.(.+)$", f".{name}")
    return m.group(1) if m else name


# ---------------------------------------------------------------------------------------------
# Between two adapters: subspace similarity (LoRA paper, section 7.2)


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


# ---------------------------------------------------------------------------------------------
# ΔW against W: the amplification factor (LoRA paper, section 7.3, Table 7)


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
    U, S, V = delta_svd(A, B, scaling)
    r = A.shape[0]
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


# ---------------------------------------------------------------------------------------------
# Layer-wise representations


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
