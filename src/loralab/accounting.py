"""Parameter accounting and frozen-base checks: pure functions over a model."""

from __future__ import annotations

import hashlib

import torch.nn as nn

from .quantization import hash_tensor, logical_numel


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


def parameter_counts(model: nn.Module, head_modules: list[str] | None = None) -> dict:
    """Total / trainable / LoRA / head parameters and the trainable shares (in %).

    `head_modules` are the freshly initialised task heads (e.g. ["score"]); under LoRA they are
    PEFT modules_to_save, under full fine-tuning ordinary modules. The LoRA paper's share counts
    adapter weights only, so the share is given both with and without the head. A quantized
    weight counts the parameters it stands for (a packed 4-bit byte holds two).
    """
    heads = set(head_modules or [])
    total = trainable = lora = head = head_trainable = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue  # frozen twin of a trained head; the head is counted once, via its copy
        n = logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
        if _is_lora(name):
            lora += n
        elif _is_saved_module(name) or heads.intersection(name.split(".")):
            head += n
            head_trainable += n if p.requires_grad else 0
    return {
        "total": total,
        "trainable": trainable,
        "lora": lora,
        "head": head,
        "trainable_share_pct": 100.0 * trainable / total if total else 0.0,
        "trainable_share_without_head_pct": 100.0 * (trainable - head_trainable) / total
        if total
        else 0.0,
        "lora_share_pct": 100.0 * lora / total if total else 0.0,
    }


def checksum(params: dict[str, nn.Parameter]) -> str:
    """SHA-256 over the exact bytes of every tensor (bit-identical check, order-independent of
    dicts); a quantized weight contributes the bytes it is stored as (int8 data and scales)."""
    h = hashlib.sha256()
    for name in sorted(params):
        hash_tensor(h, name, params[name])
    return h.hexdigest()


def frozen_base_report(model: nn.Module) -> dict:
    """Which base parameters (if any) would be updated by the optimiser."""
    trainable = [n for n, p in base_parameters(model).items() if p.requires_grad]
    return {"base_frozen": not trainable, "trainable_base_params": trainable[:20]}
