"""How fast SmolLM2-135M's own matrix products run here, at a training batch's token count.

A LoRA step on SST-2 multiplies ~200 real tokens by each weight: small products, far from the
matmul peak that large square ones reach. For every linear shape of a SmolLM2 layer (and the
LoRA factors at r = 8) this times the forward product, the input-gradient product and the
weight-gradient product in the given precision, and a large product's peak in the same run, so
that each shape's share of the peak is a ratio measured side by side.

Usage: python benchmarks/matmul_shapes.py [--tokens 224 --dtype bf16 --threads N]
Prints JSON: per shape µs and GFLOP/s of each product, the peak, and the sum over SmolLM2's 30
layers of the products a LoRA step (forward + input gradients + the factors' weight gradients)
runs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

HIDDEN, INTER, KV, RANK, LAYERS = 576, 1536, 192, 8, 30
# name -> (in, out, how many per layer, frozen in LoRA: no weight gradient)
SHAPES = {
    "q_proj / o_proj": (HIDDEN, HIDDEN, 2, True),
    "k_proj / v_proj": (HIDDEN, KV, 2, True),
    "gate_proj / up_proj": (HIDDEN, INTER, 2, True),
    "down_proj": (INTER, HIDDEN, 1, True),
    "lora_A (q, v)": (HIDDEN, RANK, 2, False),
    "lora_B (q)": (RANK, HIDDEN, 1, False),
    "lora_B (v)": (RANK, KV, 1, False),
}


def timed(fn, seconds: float = 0.3) -> float:
    """Median µs of `fn` over repeats for about `seconds`, after a warm-up."""
    for _ in range(5):
        fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 10:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6


def products(m: int, k: int, n: int, dtype: torch.dtype) -> dict[str, float]:
    """µs of a linear layer's three products: x [m, k] @ W^T, grad [m, n] @ W, grad^T @ x."""
    x, w, g = (torch.randn(*s, dtype=dtype) for s in ((m, k), (n, k), (m, n)))
    return {
        "forward": timed(lambda: x @ w.t()),
        "input_grad": timed(lambda: g @ w),
        "weight_grad": timed(lambda: g.t() @ x),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=224, help="tokens per batch (16 × 14 here)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    m = args.tokens
    big = torch.randn(2048, HIDDEN, dtype=dtype), torch.randn(HIDDEN, INTER, dtype=dtype)
    peak = 2 * 2048 * HIDDEN * INTER / timed(lambda: big[0] @ big[1]) / 1e3
    rows, step_us = {}, 0.0
    for name, (k, n, per_layer, frozen) in SHAPES.items():
        us = products(m, k, n, dtype)
        gflop = 2 * m * k * n / 1e9
        rows[name] = {
            "shape": [m, k, n],
            "us": us,
            "gflops": {p: gflop / t * 1e6 for p, t in us.items()},
            "share_of_peak": {p: gflop / t * 1e6 / peak for p, t in us.items()},
        }
        step_us += per_layer * (
            us["forward"] + us["input_grad"] + (0 if frozen else us["weight_grad"])
        )
    report = {
        "dtype": args.dtype, "threads": args.threads, "tokens": m, "peak_gflops": peak,
        "shapes": rows, "lora_step_products_ms": step_us * LAYERS / 1e3,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
