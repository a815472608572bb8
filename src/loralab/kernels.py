"""The kernels a run trains with, each decided for this model and machine and recorded in the
summary with its reason: precision, attention implementation, and whether layers are compiled."""

from __future__ import annotations

import dataclasses
import math

import torch

from . import attention, compiling, distributed, precision
from .config import ExperimentConfig
from .data import Splits, batches_per_epoch, lengths


def resolve_precision(cfg: ExperimentConfig, model_config) -> tuple[ExperimentConfig, dict]:
    """A copy of `cfg` with `train.precision` resolved for this model and machine, and why."""
    decision = precision.decide(cfg.train.precision, precision.model_shape(model_config))
    train_cfg = dataclasses.replace(cfg.train, precision=decision["precision"])
    return dataclasses.replace(cfg, train=train_cfg), decision


def choose_attention(cfg: ExperimentConfig, model_config, splits: Splits) -> dict:
    """The attention kernel for this run: set in the config, or measured at the median length."""
    if cfg.model.attention != "auto":
        return {"implementation": cfg.model.attention, "reason": "set in the config"}
    known = sorted(lengths(splits.train) or [128])
    median = known[len(known) // 2]
    shape = attention.attention_shape(model_config, cfg.train.batch_size, median)
    dtype = torch.bfloat16 if precision.uses_bf16(cfg.train.precision) else torch.float32
    return attention.decide(shape, dtype)


def planned_steps(cfg: ExperimentConfig, train_features: int) -> int:
    """Optimiser steps the run will take (`train.max_steps`, else from epochs and batches)."""
    tr = cfg.train
    if tr.max_steps > 0:
        return tr.max_steps
    batches = batches_per_epoch(train_features, tr.batch_size, distributed.world_size())
    return math.ceil(max(batches // tr.grad_accum, 1) * tr.epochs)


def choose_compile(cfg: ExperimentConfig, attention_kernel: str, train_features: int) -> dict:
    """Whether to compile the model's layers (`loralab.compiling`), and why; with "key", what
    `compiling.remember` records once the run has compiled."""
    tr, lo = cfg.train, cfg.lora
    # Everything that changes the adapted layers' graph (`lora.bias` trains base biases and keeps
    # their layers in fp32; `lora.extra` may add a LoRA bias or skip layers).
    shape = (f"r{lo.r}|{lo.target}|dropout={lo.dropout > 0}|dora={lo.use_dora}|bias={lo.bias}"
             f"|extra={sorted(lo.extra.items())}|{cfg.model.head}")  # fmt: skip
    graph = shape if tr.method == "lora" else cfg.model.head  # what the layers' graph depends on
    key = compiling.signature(cfg.model.name, tr.method, tr.precision, attention_kernel, graph)
    steps = planned_steps(cfg, train_features)
    eager = None
    if tr.gradient_checkpointing:
        eager = "gradient checkpointing is on (not tested compiled)"
    elif cfg.model.quantization != "none":
        eager = (
            f"a quantized base (model.quantization={cfg.model.quantization}; not tested compiled)"
        )
    elif torch.cuda.is_available():  # the thresholds are CPU measurements
        eager = "a CUDA GPU (not tested compiled)"
    elif not precision.uses_bf16(tr.precision):
        # The measured gains were bf16's (AMX Xeon 1.46x): inductor fuses the casts and
        # element-wise work around the products. In fp32 on an AVX2-only EPYC, the CPUs `auto`
        # trains in fp32 on, compiled steps ran 1.01x eager's after their compile (docs/configuration.md).
        eager = "fp32 on a CPU (compiled layers measured no faster than eager there)"
    return {**compiling.decide(tr.compile, steps, key, eager), "key": key}
