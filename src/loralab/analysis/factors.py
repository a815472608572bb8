"""A PEFT model's LoRA factors and, per variant, the update they make.

ΔW = s·B·A with A: [r, in], B: [out, r], s = alpha/r (alpha/sqrt(r) with rsLoRA: PEFT's
`scaling`). DoRA's update is not low-rank: its dense ΔW comes with the factors. PiSSA/OLoRA
adapters are read as loralab saves them (plain LoRA of rank 2r on the pretrained weight).
Everything else in `loralab.analysis` works on these detached factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import residual
from ..quantization import dequantized


@dataclass
class LoraFactors:
    """One adapted module's factors, detached, in fp32 (W only when asked for).

    `delta` is the dense effective update [out, in] (fp64) where s·B·A is not the update (DoRA):
    statistics then come from its SVD. For a PiSSA/OLoRA model in training, A and B are
    [A; A₀] and [B | −B₀] (rank 2r) and W the pretrained weight, as in the saved adapter.
    """

    name: str
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float
    W: torch.Tensor | None = None  # [out, in], the frozen (pretrained) base weight
    delta: torch.Tensor | None = None  # [out, in], fp64: the dense update when not s·B·A
    variant: str = "lora"  # lora | dora


class UnsupportedVariant(ValueError):
    """The adapter is a LoRA variant whose update loralab cannot compute from the stored weights."""


# Initialisations that rewrite the base weight (PiSSA/OLoRA/CorDA keep a residual W − s·B₀A₀,
# LoftQ a quantised one): s·B·A alone is then not the learned update. loralab saves PiSSA and
# OLoRA adapters converted (`loralab.residual`): their saved config says init True.
RESIDUAL_INITS = ("pissa", "olora", "loftq", "corda", "eva")

# How each variant's update is computed, for analysis.json.
UPDATES = {
    "lora": "ΔW = s·B·A (s = alpha/r, or alpha/sqrt(r) with rsLoRA); statistics from the r×r core",
    "dora": (
        "DoRA: ΔW = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ − W (per output row, PEFT's convention); not "
        "low-rank, so the statistics come from the SVD of the dense ΔW"
    ),
}


def _setting(config, key: str, default):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def unsupported_variant(peft_config) -> str | None:
    """Why the adapter analysis would be wrong for this adapter config, or None if it is right.

    `peft_config`: a `peft.LoraConfig`, the saved adapter_config.json (a dict) or loralab's
    `lora` section. DoRA and rsLoRA are covered; a residual initialisation only as loralab saves
    it (converted to plain LoRA, init True) or in a model that recorded A₀/B₀ (training).
    """
    init = _setting(peft_config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        return (
            f"init_lora_weights={init!r} replaces the base weight by a residual, so s·B·A is "
            "not the update to the original weight (loralab saves PiSSA and OLoRA adapters "
            "converted to plain LoRA on the original weights; an adapter still marked "
            f"{init!r} was saved otherwise, and other residual initialisations are not covered)"
        )
    return None


def lora_factors(
    model: nn.Module, adapter: str = "default", with_base: bool = False, check_variant: bool = True
) -> list[LoraFactors]:
    """Every LoRA-wrapped layer of a PEFT model, in module order.

    Raises UnsupportedVariant for variants whose update cannot be read off the stored weights
    (residual initialisations other than a recorded PiSSA/OLoRA): their numbers would be
    silently wrong. `check_variant=False` is for structural uses that only read the stored
    factors (counting layers, finding B = 0): no variant handling, no dense update.
    """
    initial = residual.initial_adapter(model) if check_variant else None
    peft_config = getattr(model, "peft_config", {}).get(adapter) if check_variant else None
    why = unsupported_variant(peft_config) if peft_config is not None else None
    if why and initial is None:
        raise UnsupportedVariant(f"The adapter analysis does not cover this adapter yet: {why}.")
    dora = check_variant and bool(_setting(peft_config, "use_dora", False))
    out = []
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, nn.ModuleDict) or adapter not in lora_A:
            continue
        A = lora_A[adapter].weight.detach().float()
        B = module.lora_B[adapter].weight.detach().float()
        scaling = float(module.scaling[adapter])
        W = base_weight(module) if with_base or dora else None
        if initial is not None:  # training PiSSA/OLoRA: relative to the pretrained weight
            A0 = initial.state[f"{name}.lora_A.weight"].to(A.device, torch.float32)
            B0 = initial.state[f"{name}.lora_B.weight"].to(A.device, torch.float32)
            if W is not None:  # W_res + s·B₀·A₀ = the pretrained weight
                W = W + scaling * (B0 @ A0)
            A, B = torch.cat([A, A0]), torch.cat([B, -B0], dim=1)
        delta = (
            dora_update(W, A, B, scaling, module.lora_magnitude_vector[adapter].weight)
            if dora
            else None
        )
        W = W if with_base else None
        out.append(
            LoraFactors(short_name(name), A, B, scaling, W, delta, "dora" if dora else "lora")
        )
    return out


def dora_update(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """DoRA's effective update m ⊙ V / ‖V‖ − W with V = W + s·B·A, norms per output row, fp64.

    W: [out, in], A: [r, in], B: [out, r], magnitude: [out]. As PEFT computes it (its
    `get_weight_norm` takes the norm over the input dimension of the [out, in] weight).
    """
    # The norm in the weights' fp32, as PEFT computed the initial magnitude (‖W‖ per row): taken
    # in fp64, m/‖V‖ at init is 1 ± 6e-8, which left a full-rank round-off ΔW (effective rank
    # ~40 of 64 where B = 0). The rest in fp64: V − W would cancel in fp32.
    norm = torch.linalg.norm(W.float() + scaling * (B.float() @ A.float()), dim=1).double()
    W = W.double()
    V = W + scaling * (B.double() @ A.double())
    scale = magnitude.detach().double() / norm
    return scale[:, None] * V - W


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen base weight of a LoRA layer as [out, in], fp32 (a quantized one dequantized)."""
    W = dequantized(module.get_base_layer().weight.detach()).float()
    # GPT-2's Conv1D stores [in, out]; PEFT marks such layers with fan_in_fan_out.
    return W.T if getattr(module, "fan_in_fan_out", False) else W


def short_name(name: str) -> str:
    """A module name without PEFT's wrapper prefix ("base_model.model.x" -> "x")."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name
