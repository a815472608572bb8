"""Training precision: which dtype the frozen base is stored in, and when bf16 autocast is on.

`fp32`: everything fp32. `bf16`: matrix products in bf16 (autocast). For LoRA the frozen base is
also *stored* in bf16: it is never updated, so it needs no fp32 master copy, and autocast then
has no base weights to cast each step; adapters and head stay fp32 (they are what the optimiser
updates). Full fine-tuning keeps fp32 master weights under bf16 autocast. `auto` is bf16 where the
hardware multiplies bf16 natively and fp32 elsewhere: CPUs without bf16 instructions (e.g. AVX2
only) run bf16 matrix products ~100× slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


@functools.cache
def native_bf16(device: str | None = None) -> bool:
    """Whether `device` (default: cuda if present, else cpu) has fast bf16 matrix products."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume no bf16 instructions
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve(precision: str) -> str:
    """`auto` -> `bf16` or `fp32` for this machine; `fp32`/`bf16` unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every parameter that does not train in `dtype`; returns how many were cast.

    Trainable parameters (LoRA factors, the head) keep their fp32 master copy. Buffers (e.g.
    rotary frequencies) are left alone: they are small and some need fp32 range.
    """
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


def autocast(enabled: bool, device: str | torch.device | None = None):
    """bf16 autocast on `device` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.autocast(device.type, dtype=torch.bfloat16)


def dtypes(model: torch.nn.Module) -> dict[str, str]:
    """The storage dtype of frozen and trainable parameters (for the run summary)."""
    frozen = {str(p.dtype) for p in model.parameters() if not p.requires_grad}
    trainable = {str(p.dtype) for p in model.parameters() if p.requires_grad}
    fmt = lambda s: ",".join(sorted(x.removeprefix("torch.") for x in s)) or "none"  # noqa: E731
    return {"frozen": fmt(frozen), "trainable": fmt(trainable)}
