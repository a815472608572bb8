"""What `loralab/fused.py` saves and costs: one process, plain and fused models side by side.

For LoRA and full fine-tuning it builds the same model twice (LORALAB_FUSED=0 and =1, as
`loralab train` builds it, in the precision `auto` picks) and runs their training steps
(forward + backward) alternately on one batch, so that a load that comes and goes hits both
alike. Per method: the median step time of each and their ratio, and the megabytes autograd
keeps for backward in one step (counted with saved-tensor hooks, parameters left out).
Separate processes per configuration (as `train_throughput.py` runs them) differ by up to ±20%
from one process to the next on the shared build machines; steps interleaved in one process
measure a few-percent difference.

Also the LoRA dropout masks alone: PyTorch's `bernoulli_` against `fused.keep_mask`, in ns per
element (`masks`).

Usage: python benchmarks/fused_ops.py [--rounds 30 --batch 16 --length 14 --threads N]
Prints JSON to stdout (SmolLM2-135M; LORALAB_BENCH_MODEL=tiny-llama for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch

MODEL = os.environ.get("LORALAB_BENCH_MODEL", "smollm2-135m")


def build(method: str, fused_on: bool):
    from loralab.config import build_config
    from loralab.models import load_tokenizer
    from loralab.tasks import get_task
    from loralab.train import build_model

    os.environ["LORALAB_FUSED"] = "1" if fused_on else "0"
    cfg = build_config(overrides=[f"model.name={MODEL}", f"train.method={method}"])
    tok = load_tokenizer(cfg.model.name, progress=False)
    torch.manual_seed(0)
    built = build_model(cfg, get_task("sst2"), tok, progress=False, attention="eager")
    return built, cfg


def _step(model, batch, bf16: bool, pack=None) -> None:
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if pack else nullcontext()
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()  # outside the hooks: what a backward pass recomputes is not kept
    model.zero_grad(set_to_none=True)


def saved_mb(model, batch, bf16: bool) -> float:
    """MB of distinct non-parameter tensors autograd keeps from one step's forward pass for its
    backward (before 2026-12-02 17:50 this counted the backward pass's own saves too)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    _step(model, batch, bf16, pack)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20


def measure(method: str, rounds: int, batch_size: int, length: int) -> dict:
    from loralab import precision

    (plain, cfg), (fused, _) = build(method, False), build(method, True)
    bf16 = precision.uses_bf16(cfg.train.precision, precision.model_shape(plain.model.config))
    vocab = plain.model.config.vocab_size
    batch = {
        "input_ids": torch.randint(5, min(vocab, 1000), (batch_size, length)),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,)),
    }
    models = {"plain": plain.model.train(), "fused": fused.model.train()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for model in models.values():
        _step(model, batch, bf16)  # warm-up
    for _ in range(rounds):
        for name, model in models.items():
            t = time.perf_counter()
            _step(model, batch, bf16)
            times[name].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "precision": "bf16" if bf16 else "fp32",
        "fused_ops": fused.fused,
        "step_s": median,
        "fused_over_plain_time": median["fused"] / median["plain"],
        "saved_mb": {k: saved_mb(m, batch, bf16) for k, m in models.items()},
    }


def masks(rounds: int, shape: tuple[int, ...], p: float = 0.05) -> dict:
    """ns per element of a LoRA dropout's mask: PyTorch's `bernoulli_` (what `nn.Dropout` draws)
    against `fused.keep_mask` (what the fused dropout draws here), interleaved, best of rounds."""
    from loralab import fused

    like = torch.empty(shape, dtype=torch.bfloat16)
    draws = {
        "bernoulli": lambda: torch.empty_like(like).bernoulli_(1 - p),
        "keep_mask": lambda: fused.keep_mask(like, p),
    }
    best = {k: float("inf") for k in draws}
    for _ in range(rounds):
        for name, draw in draws.items():
            t = time.perf_counter()
            draw()
            best[name] = min(best[name], time.perf_counter() - t)
    ns = {k: v / like.numel() * 1e9 for k, v in best.items()}
    return {
        "shape": list(shape),
        "ns_per_element": ns,
        "bernoulli_over_keep_mask": ns["bernoulli"] / ns["keep_mask"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved steps per model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=14, help="tokens per example (SST-2: ~13)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--methods", default="lora,full")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"model": MODEL, "threads": args.threads, "batch": [args.batch, args.length]}
    for method in args.methods.split(","):
        report[method] = measure(method, args.rounds, args.batch, args.length)
    report["masks"] = masks(args.rounds, (args.batch, args.length, 576))  # SmolLM2's width
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
