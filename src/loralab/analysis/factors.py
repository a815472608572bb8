"""A PEFT model's LoRA factors, and the variants whose factors do not describe their update.

ΔW = s·B·A with A: [r, in], B: [out, r], s = alpha/r. Everything else in `loralab.analysis`
works on these detached fp32 factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..quantization import dequantized


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
RESIDUAL_INITS = ("pissa", "olora", "loftq", "corda", "eva")


def unsupported_variant(peft_config) -> str | None:
    """Why the factor analysis would be wrong for this `peft.LoraConfig`, or None if it is right."""
    if getattr(peft_config, "use_dora", False):
        return (
            "DoRA (use_dora) rescales every output row by a learned magnitude, so the update is "
            "not s·B·A"
        )
    init = getattr(peft_config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
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
        W = base_weight(module) if with_base else None
        out.append(LoraFactors(short_name(name), A, B, scaling, W))
    return out


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
