"""Attention kernel choice by measurement: `sdpa` or `eager` for this device, dtype and length.

On CPUs the fused scaled-dot-product kernels carry a fixed cost per call that dominates at the
short sequences of GLUE (a LoRA step on 16-token SST-2 batches spent 36% of its time in the
flash-attention backward), while the eager path (two batched matrix products and a softmax) is
cheap there. At long sequences the fused kernel can win. So `auto` times one attention forward +
backward in both forms at the run's shape and takes the faster, cached per machine and shape
under $LORALAB_CACHE like the precision probe. GPUs get `sdpa`.
"""

from __future__ import annotations

import math
import time

import torch

from . import probecache

CACHE_FILE = "attention-probe.json"
PROBE_VERSION = 2  # 2: interleaved bursts (version 1 probes could be skewed by load)
_memo: dict[tuple, dict] = {}


def attention_shape(config, batch: int, length: int) -> tuple[int, int, int, int]:
    """(batch, heads, length, head_dim) of a transformers config at a batch size and length."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 64
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return (int(batch), int(heads), int(length), int(head_dim))


def _eager(q, k, v):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1) @ v


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _time(fn, shape, dtype, budget_s: float) -> float:
    """Best seconds per attention forward + backward over a few rounds."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))

    def step():
        fn(q, k, v).sum().backward()

    step()
    t0 = time.perf_counter()
    step()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(100, int(budget_s / 6 / once)))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def decide(shape: tuple[int, int, int, int], dtype: torch.dtype, timer=_time, budget_s=0.4) -> dict:
    """{"implementation": "sdpa" | "eager", "reason", "probe"?} for training at `shape`."""
    if torch.cuda.is_available():
        return {"implementation": "sdpa", "reason": "cuda"}
    threads = torch.get_num_threads()
    key = (
        f"{probecache.machine()}|{'x'.join(map(str, shape))}|{dtype}|t{threads}|"
        f"{torch.__version__}|v{PROBE_VERSION}"
    )
    if timer is _time and key in _memo:
        return _memo[key]
    stored = probecache.read(CACHE_FILE)
    if timer is _time and key in stored:
        return {**stored[key], "cached": True}
    sdpa_s, eager_s = probecache.best_of_interleaved(
        lambda: timer(_sdpa, shape, dtype, budget_s / 3),
        lambda: timer(_eager, shape, dtype, budget_s / 3),
    )
    out = {
        "implementation": "eager" if eager_s < sdpa_s else "sdpa",
        "reason": "measured",
        "probe": {"sdpa_s": sdpa_s, "eager_s": eager_s, "shape": list(shape), "dtype": str(dtype)},
    }
    if timer is _time:
        _memo[key] = out
        probecache.store(CACHE_FILE, key, out)
    return out
