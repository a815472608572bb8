"""What a lent core buys a study's training run (loralab.study.spare_cores).

One process builds a run's model as `loralab train` does (SmolLM2-135M, precision auto), then
times training steps on fixed random batches (batch × length tokens), switching its thread
count between 1 and all cores as a lent run does (1, N, 1, N, ...: the machine's drift hits both
alike). Needs the machine to itself (pause other work first).

Usage: python benchmarks/spare_cores.py [--model smollm2-135m] [--task squad_v2] [--method lora]
       [--length 384] [--batch 16] [--steps 3] [--rounds 2]
Prints JSON: per thread count the median step wall and CPU seconds; the speed-up (wall, 1 thread
over N) and the CPU cost (CPU seconds per step, N over 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loralab.study import spare_cores


def build(task_name: str, method: str, model_name: str):
    from transformers import AutoConfig

    from loralab.config import build_config
    from loralab.kernels import resolve_precision
    from loralab.models import load_tokenizer, resolve
    from loralab.tasks import get_task
    from loralab.train import build_model

    cfg = build_config(overrides=[f"data.task={task_name}", f"model.name={model_name}",
                                  f"train.method={method}"])  # fmt: skip
    cfg, decision = resolve_precision(cfg, AutoConfig.from_pretrained(resolve(cfg.model.name)))
    task = get_task(task_name)
    built = build_model(cfg, task, load_tokenizer(cfg.model.name), progress=False)
    return built.model, cfg, decision["precision"]


def step_fn(model, cfg, task_name: str, batch: int, length: int):
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (batch, length), generator=gen),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}  # fmt: skip
    if task_name == "squad_v2":
        pos = torch.randint(0, length, (batch,), generator=gen)
        inputs |= {"start_positions": pos, "end_positions": pos}
    else:
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    bf16 = cfg.train.precision == "bf16"
    model.train()

    def step() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, time.process_time() - c

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama: a smoke test")
    ap.add_argument("--task", default="squad_v2")
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--length", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and thread count")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cores = spare_cores.usable_cores()  # what a lent run would take
    torch.set_num_threads(1)
    model, cfg, prec = build(args.task, args.method, args.model)
    step = step_fn(model, cfg, args.task, args.batch, args.length)
    step()  # warm-up (allocator, kernels)
    times: dict[int, list[tuple[float, float]]] = {1: [], cores: []}
    for _ in range(args.rounds):
        for threads in (1, cores):
            torch.set_num_threads(threads)  # mid-process, as a lent run switches
            step()  # the first step after a switch warms the new thread pool
            times[threads] += [step() for _ in range(args.steps)]
    med = {n: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
           for n, ts in times.items()}  # fmt: skip
    print(json.dumps({
        "task": args.task, "method": args.method, "precision": prec, "cores": cores,
        "tokens_per_step": args.batch * args.length,
        "step_s": {str(n): round(m[0], 2) for n, m in med.items()},
        "cpu_s_per_step": {str(n): round(m[1], 2) for n, m in med.items()},
        "speedup": round(med[1][0] / med[cores][0], 3),
        "cpu_cost": round(med[cores][1] / med[1][1], 3),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
