"""Training precision: which dtype the frozen base is stored in, and when bf16 autocast is on.

`fp32`: everything fp32. `bf16`: matrix products in bf16 (autocast). For LoRA the frozen base is
also *stored* in bf16: it is never updated, so it needs no fp32 master copy, and autocast then
has no base weights to cast each step; adapters and head stay fp32 (they are what the optimiser
updates), and the model converts activations at their boundaries itself, so it runs outside the
trainer's autocast too (a notebook, merge, a test). Full fine-tuning keeps fp32 master weights
under bf16 autocast.

`auto` is decided by measurement: a CPU without bf16 instructions (AVX2 only) runs bf16 matrix
products ~100× slower than fp32, so it gets fp32 at once; a CPU with them (AVX512-BF16/AMX) runs
a ~1 s probe of model-shaped products in both dtypes and takes the faster (small shapes can lose
in bf16), cached per machine and shape under $LORALAB_CACHE. `LORALAB_PRECISION=fp32|bf16`
forces the choice that `auto` makes (for tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch

from . import probecache
from .errors import LoralabError

ENV = "LORALAB_PRECISION"
CACHE_FILE = "precision-probe.json"
PROBE_VERSION = 2  # 2: interleaved bursts (version 1 probes could be skewed by load)
DEFAULT_SHAPE = (256, 576, 1536)  # tokens, hidden, intermediate: SmolLM2-135M at a batch of 16
_memo: dict[tuple, dict] = {}


@functools.cache
def native_bf16(device: str | None = None) -> bool:
    """Whether `device` (default: cuda if present, else cpu) has bf16 matrix instructions."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(probecache.cpu_flags() & {"avx512_bf16", "amx_bf16"})


def model_shape(config, tokens: int = 256) -> tuple[int, int, int]:
    """(tokens, hidden, intermediate) of a transformers config, for the probe."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 576
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return (tokens, int(hidden), int(inter or 4 * hidden))


def _time(dtype: torch.dtype, shape: tuple[int, int, int], budget_s: float) -> float:
    """Seconds per (x @ W1, silu, @ W2) block in `dtype`, the best of a few timed rounds."""
    n, h, i = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).to(dtype)
    w1 = torch.randn(h, i, generator=g).to(dtype) / h**0.5
    w2 = torch.randn(i, h, generator=g).to(dtype) / i**0.5

    def block():
        return torch.nn.functional.silu(x @ w1) @ w2

    block()  # warm-up (kernel selection, AMX tile configuration)
    t0 = time.perf_counter()
    block()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(200, int(budget_s / 5 / once)))
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            block()
        rounds.append((time.perf_counter() - t0) / reps)
    return min(rounds)  # the least disturbed round: other processes only ever add time


def probe(shape: tuple[int, int, int] = DEFAULT_SHAPE, timer=_time, budget_s: float = 0.5) -> dict:
    """Time model-shaped products in fp32 and bf16 on this CPU; cached per machine and shape.

    Returns {"fp32_s", "bf16_s", "shape", "threads", "choice", "cached"}. `timer` is injectable
    (tests feed it timings).
    """
    threads = torch.get_num_threads()
    key = f"{probecache.machine()}|{torch.__version__}|t{threads}|{'x'.join(map(str, shape))}|v{PROBE_VERSION}"
    stored = probecache.read(CACHE_FILE)
    if timer is _time and key in stored:
        return {**stored[key], "cached": True}
    fp32_s, bf16_s = probecache.best_of_interleaved(
        lambda: timer(torch.float32, shape, budget_s / 3),
        lambda: timer(torch.bfloat16, shape, budget_s / 3),
    )
    result = {
        "fp32_s": fp32_s,
        "bf16_s": bf16_s,
        "shape": list(shape),
        "threads": threads,
        "choice": "bf16" if bf16_s < fp32_s else "fp32",
    }
    if timer is _time:
        probecache.store(CACHE_FILE, key, result)
    return {**result, "cached": False}


def decide(precision: str, shape: tuple[int, int, int] | None = None, timer=_time) -> dict:
    """The precision to train in and why: {"precision", "reason", "probe"?}."""
    if precision != "auto":
        return {"precision": precision, "reason": "set in the config"}
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise LoralabError(
                f"{ENV}={forced!r} is not a precision: set it to fp32 or bf16, or unset it "
                "to let `auto` measure."
            )
        return {"precision": forced, "reason": f"forced by {ENV}"}
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"precision": "bf16" if bf16 else "fp32", "reason": "cuda"}
    if not native_bf16("cpu"):
        return {"precision": "fp32", "reason": "cpu without bf16 instructions"}
    shape = tuple(shape or DEFAULT_SHAPE)
    memo_key = (shape, torch.get_num_threads())
    if timer is _time and memo_key in _memo:
        return _memo[memo_key]
    p = probe(shape, timer)
    out = {"precision": p["choice"], "reason": "measured", "probe": p}
    if timer is _time:
        _memo[memo_key] = out
    return out


def resolve(precision: str, shape: tuple[int, int, int] | None = None) -> str:
    """`auto` -> `bf16` or `fp32` for this machine (see `decide`); `fp32`/`bf16` unchanged."""
    return decide(precision, shape)["precision"]


def uses_bf16(precision: str, shape: tuple[int, int, int] | None = None) -> bool:
    """True when `precision` (`auto` resolved for this machine) means bf16 autocast."""
    return resolve(precision, shape) == "bf16"


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every parameter that does not train in `dtype`; returns how many were cast.

    Trainable parameters (LoRA factors, the head) keep their fp32 master copy. A module that owns
    a trainable parameter directly (e.g. a Linear whose bias trains) keeps all its own parameters
    in fp32, so its weight and bias agree. Buffers (e.g. rotary frequencies) are left alone.
    """
    n = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own):
            continue
        for p in own:
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += p.numel()
    return n


def _cast(obj, dtype: torch.dtype):
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding", "lora_magnitude_vector", "lora_dropout")


def bridge_dtypes(model: torch.nn.Module, heads: list[str], dtype=torch.bfloat16) -> int:
    """Make a bf16-stored base with fp32 trainable modules callable without autocast.

    Every module that kept fp32 parameters (the head, a module with a trainable bias) gets its
    inputs cast to fp32; its outputs go back to `dtype` unless it is part of a task head (whose
    output is the final logits). PEFT's LoRA layers convert on their own and are skipped.
    Returns the number of hooked modules.
    """
    n = 0
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if not own or own[0].dtype == dtype or any(part in name for part in _ADAPTER_PARTS):
            continue
        master = own[0].dtype
        module.register_forward_pre_hook(
            lambda _m, args, kwargs, d=master: (_cast(args, d), _cast(kwargs, d)), with_kwargs=True
        )
        in_head = any(f".{h}." in f".{name}." for h in heads)
        if not in_head:
            module.register_forward_hook(lambda _m, _a, out, d=dtype: _cast(out, d))
        n += 1
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
