"""Parameter accounting and frozen-base checks: pure functions over a model."""

from __future__ import annotations

import re

import torch.nn as nn

from . import quantization
from .lora import linear_layer
from .quantization import logical_numel


def _is_lora(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_") or ".lora_magnitude_vector" in name


def _is_saved_module(name: str) -> bool:
    # PEFT keeps a trainable copy of each modules_to_save entry under "modules_to_save.<adapter>".
    return ".modules_to_save." in name


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The pretrained weights LoRA must leave untouched (not adapters, not trainable head copies)."""
    return {
        n: p for n, p in model.named_parameters() if not _is_lora(n) and not _is_saved_module(n)
    }


# PEFT's infixes in a module name: the wrapped layer ("q_proj.base_layer"), its adapter factors
# ("q_proj.lora_A.default", DoRA's "q_proj.lora_magnitude_vector.default") and a trained copy
# ("score.modules_to_save.default") all stand for the layer they belong to ("q_proj", "score").
_PEFT_INFIX = re.compile(
    r"\.base_layer(?=\.|$)|\.(?:lora_[A-Za-z_]+|modules_to_save)(?:\.[^.]+)?(?=\.|$)"
)
_LINEAR_ROLES = ("q", "k", "v", "qkv", "o", "mlp")  # lora.py's roles kept as they are
ROLES = ("q", "k", "v", "qkv", "o", "mlp", "head", "other")


def _unwrapped(module_name: str) -> str:
    return _PEFT_INFIX.sub("", module_name)


def _linear_roles(model: nn.Module) -> dict[str, str]:
    """{unwrapped module name: role} for every Linear / Conv1D layer, PEFT-wrapped or not."""
    roles = {}
    for name, module in model.named_modules():
        if _is_lora(name):
            continue  # an adapter factor is a Linear of its own shape, not the layer it adapts
        layer = linear_layer(_unwrapped(name), module)
        if layer is not None:
            roles[layer.name] = layer.role
    return roles


def parameter_counts(model: nn.Module, head_modules: list[str] | None = None) -> dict:
    """Total / trainable / LoRA / head / other saved parameters, the trainable shares (in %)
    and a breakdown by module role.

    `head_modules` are the freshly initialised task heads (e.g. ["score"]); under LoRA they are
    PEFT modules_to_save, under full fine-tuning ordinary modules. `other_saved` counts the
    other modules_to_save entries (trained in full, e.g. a user's `embed_tokens`), which are not
    part of `head`. The LoRA paper's share counts adapter weights only, so the share is given
    both with and without the head. A quantized weight counts the parameters it stands for (a
    packed 4-bit byte holds two).

    Returns {"total", "trainable", "lora", "head", "other_saved": int,
    "trainable_share_pct", "trainable_share_without_head_pct", "lora_share_pct": float,
    "by_module": {role: {"total", "trainable", "lora": int}}}. Roles: q, k, v, qkv (fused
    q/k/v projections, only when the model has one), o, mlp (as `lora.linear_layer` names the
    linear layers), head (`head_modules`), other (embeddings, norms, anything else). An adapter
    factor counts under the layer it adapts; the roles' counts add up to the totals.
    """
    heads = set(head_modules or [])
    roles = _linear_roles(model)
    by_module = {r: {"total": 0, "trainable": 0, "lora": 0} for r in ROLES}
    total = trainable = lora = head = head_trainable = other_saved = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue  # frozen twin of a trained head; the head is counted once, via its copy
        n = logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
        is_head = bool(heads.intersection(name.split(".")))
        if _is_lora(name):
            lora += n
        elif is_head:
            head += n
            head_trainable += n if p.requires_grad else 0
        elif _is_saved_module(name):
            other_saved += n
        role = roles.get(_unwrapped(name.rpartition(".")[0]))
        role = "head" if is_head else role if role in _LINEAR_ROLES else "other"
        counts = by_module[role]
        counts["total"] += n
        counts["trainable"] += n if p.requires_grad else 0
        counts["lora"] += n if _is_lora(name) else 0
    if not by_module["qkv"]["total"]:
        del by_module["qkv"]
    return {
        "total": total,
        "trainable": trainable,
        "lora": lora,
        "head": head,
        "other_saved": other_saved,
        "trainable_share_pct": 100.0 * trainable / total if total else 0.0,
        "trainable_share_without_head_pct": 100.0 * (trainable - head_trainable) / total
        if total
        else 0.0,
        "lora_share_pct": 100.0 * lora / total if total else 0.0,
        "by_module": by_module,
    }


def checksum(params: dict[str, nn.Parameter]) -> str:
    """SHA-256 over the exact bytes of every tensor (bit-identical check, order-independent of
    dicts); a quantized weight contributes the bytes it is stored as (int8 data and scales)."""
    return quantization.checksum(params)


def frozen_base_report(model: nn.Module) -> dict:
    """Which base parameters (if any) would be updated by the optimiser."""
    trainable = [n for n, p in base_parameters(model).items() if p.requires_grad]
    return {"base_frozen": not trainable, "trainable_base_params": trainable[:20]}
