"""Inference benchmark: base, adapter (unmerged) and merged model on the same full batches,
timed round by round so that background load hits every model alike."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from .equivalence import DTYPES
from .inputs import Loaded, device


def make_bench_batches(
    features, n: int, batch_size: int, seq_len: int, with_token_types: bool
) -> list[dict]:
    """`n` full batches [batch_size, seq_len] cut from the dev token stream (cycled): no padding,
    so every model sees exactly batch_size·seq_len real tokens."""
    stream = np.concatenate([np.asarray(ids) for ids in features["input_ids"]])
    need = n * batch_size * seq_len
    ids = torch.from_numpy(np.resize(stream, need).astype(np.int64)).view(n, batch_size, seq_len)
    out = []
    for b in ids:
        batch = {"input_ids": b, "attention_mask": torch.ones_like(b)}
        if with_token_types:
            batch["token_type_ids"] = torch.zeros_like(b)
        out.append(batch)
    return out


@torch.inference_mode()
def benchmark(models: dict[str, nn.Module], batches: list[dict], warmup: int) -> dict:
    """Latency per batch for each model on the same batches, interleaved round by round (with a
    rotating order) so background load hits every model alike."""
    dev = device()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, batch in enumerate(batches):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            sync()
            t0 = time.perf_counter()
            models[name](**batch)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = int(batches[0]["input_ids"].numel())
    out = {}
    for name, ts in times.items():
        a = np.asarray(ts)
        med = float(np.median(a))
        out[name] = {
            "median_s": med,
            "p90_s": float(np.percentile(a, 90)),
            "mean_s": float(a.mean()),
            "min_s": float(a.min()),
            "tokens_per_s": tokens / med,
        }
    return out


def run_benchmark(
    run: Loaded, merged: nn.Module, dtype: str, batch_size, seq_len, n, warmup
) -> dict:
    """Base, adapter (unmerged) and merged model on the same full batches, in `dtype`."""
    dt, dev = DTYPES[dtype], device()
    base = run.base().to(dev, dt)
    models = {"base": base, "adapter": run.reference.to(dtype=dt), "merged": merged}
    token_types = "token_type_ids" in run.feats.column_names
    batches = make_bench_batches(run.feats, warmup + n, batch_size, seq_len, token_types)
    timings = benchmark(models, batches, warmup)
    b = timings["base"]["median_s"]
    return {
        "dtype": dtype,
        "device": dev.type,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "batches": n,
        "warmup": warmup,
        "models": timings,
        "adapter_overhead_pct": 100 * (timings["adapter"]["median_s"] / b - 1),
        "merged_vs_base_pct": 100 * (timings["merged"]["median_s"] / b - 1),
    }
