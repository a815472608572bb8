"""Training throughput of loralab against the baselines a user would write, in one run.

Configurations (each for LoRA and full fine-tuning, SmolLM2-135M, SST-2, batch 16):
  A  run_glue.py-style: Trainer (+ PEFT), every example padded to 128, random order, fp32
  B  Trainer (+ PEFT) with dynamic padding, random order, fp32
  C0 C without loralab.fused (LORALAB_FUSED=0): what its leaner autograd saves, in memory and time
  C  loralab defaults (`loralab train`: length-grouped batches, precision auto)
  D  loralab's fastest setting: C without LoRA dropout, and in bf16 (where the hardware has it)
     with compiled layers (train.compile=true; its first step compiles, the warm-up steps hide
     it); in fp32 eager, since compiled layers measured no faster there (docs/benchmarks.md)

C0, C and D run under the heap allocator `loralab` itself chooses (loralab.allocator: tcmalloc or
jemalloc where installed), A and B under the system's, as a plain script would; each row names its
allocator.

C and D batch by length, and the sampler serves each group of batches longest first: they measure
at least one whole group (31 steps at the default 2,000-example pool), so that their tokens/s is
not that of the longest batches only. A and B draw batches in random order.

Each configuration runs in its own child process (so peak RSS is its own), one after another in
this run, so the ratios between them hold on a shared, noisy machine. Per configuration: real
(non-pad) and padded tokens/s and step time over the measured steps (after warm-up steps), peak
RSS, and MFU = model FLOPs per real token × real tokens/s ÷ the matmul peak measured in this run.
Model FLOPs per token: 2·N forward, +2·N input gradients, +2·N weight gradients (full only), with N
the decoder's linear-layer weights (LoRA: 4·N; full: 6·N).

Usage:
  python benchmarks/train_throughput.py --data-dir ../shared/data/glue/sst2 [--steps 6 --warmup 2]
Prints a table to stderr and JSON to stdout. With a CUDA GPU present, C and D also run there (bf16)
against the GPU's bf16 matmul peak; without one that part is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from loralab import allocator

MODEL = os.environ.get("LORALAB_BENCH_MODEL", "smollm2-135m")  # tiny-llama: a smoke test
BATCH = 16
CONFIGS = {
    "A": "run_glue-style: pad to 128, random order, fp32",
    "B": "Trainer + dynamic padding, random order, fp32",
    "C0": "loralab defaults without its fused ops (LORALAB_FUSED=0)",
    "C": "loralab defaults",
    "D": "loralab fastest",
}


# -- the machine's matmul peak ------------------------------------------------------------------
def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best GFLOP/s of model-shaped products ([tokens, 576] @ [576, 1536] on the CPU; large
    square products on a GPU) over a few repeats."""
    from loralab.precision import native_bf16

    if device == "cuda":
        m = k = n = 8192
    else:
        slow = dtype == torch.bfloat16 and not native_bf16("cpu")
        m, k, n = (128 if slow else 2048), 576, 1536
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == 0.0:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def group_batches(examples: int) -> int:
    """Batches in one group of transformers' length-grouped sampler (its "megabatch": 50 batches,
    fewer for a small pool), each group a random draw sorted longest first."""
    return max(1, min(examples // (BATCH * 4), 50))


# -- measuring inside a child ---------------------------------------------------------------------
class Meter(TrainerCallback):
    """Times the steps after warm-up and counts their tokens (from the trainer's counters)."""

    def __init__(self, warmup: int, counter=None, sync: bool = False):
        # `loralab.train` hands a callback its trainer and (attribute None) its TokenCounts.
        self.warmup, self.trainer, self.tokens, self.counter = warmup, None, None, counter
        self.sync = sync  # CUDA: wait for the step's kernels, else the clock sees launches only
        self.t = self.real = self.padded = 0.0
        self.steps = 0

    def _tokens(self):
        if self.tokens is not None:  # loralab's own counts
            return self.tokens.real, self.tokens.padded
        return self.counter.tokens_real, self.counter.tokens_padded  # the baseline's trainer

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step >= self.warmup:
            if self.sync:
                torch.cuda.synchronize()
            self._t0, (self._r0, self._p0) = time.perf_counter(), self._tokens()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step > self.warmup:
            if self.sync:
                torch.cuda.synchronize()
            r, p = self._tokens()
            self.t += time.perf_counter() - self._t0
            self.real += r - self._r0
            self.padded += p - self._p0
            self.steps += 1


def _flops_per_token(model, method: str) -> float:
    """2·N per pass over the decoder's linear weights; LoRA 2 passes (fwd, input grads), full 3."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = sum(
        m.weight.numel()
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name and name.startswith("model.")
    )
    return (4 if method == "lora" else 6) * n


def _baseline(spec: dict, data_dir: str, out: Path) -> tuple[Meter, object]:
    """Configurations A and B: the stock Trainer (+ PEFT), as a user would write it."""
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from loralab.models import load_model, load_tokenizer
    from loralab.tasks import get_task

    tok = load_tokenizer(MODEL, progress=False)
    raw = get_task("sst2").load("train", data_dir)  # the same TSV reader; text_a, label
    raw = raw.shuffle(seed=42).select(range(min(spec["examples"], len(raw))))
    pad = spec["config"] == "A"
    ds = raw.map(
        lambda b: tok(
            [t.strip() for t in b["text_a"]], truncation=True, max_length=128,
            padding="max_length" if pad else False,
        ),
        batched=True,
        remove_columns=raw.column_names,
    ).add_column("labels", raw["label"])  # fmt: skip
    model, _ = load_model(MODEL, AutoModelForSequenceClassification, num_labels=2, progress=False)
    model.config.pad_token_id = tok.pad_token_id
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type="SEQ_CLS",
                r=8,
                lora_alpha=16,
                lora_dropout=0.05,
                target_modules=["q_proj", "v_proj"],
            ),
        )

    class CountingTrainer(Trainer):  # counting only: the training step itself is the stock one
        tokens_real = tokens_padded = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.tokens_real += int(inputs["attention_mask"].sum())
            self.tokens_padded += inputs["attention_mask"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    meter = Meter(spec["warmup"])
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=spec["warmup"] + spec["steps"],
        learning_rate=3e-4 if spec["method"] == "lora" else 3e-5, save_strategy="no", report_to="none",
        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=42,
    )  # fmt: skip
    trainer = CountingTrainer(
        model=model, args=args, train_dataset=ds, callbacks=[meter],
        data_collator=default_data_collator if pad else DataCollatorWithPadding(tok),
    )  # fmt: skip
    meter.counter = trainer
    trainer.train()
    return meter, model


def _bf16_here() -> bool:
    """Whether `auto` precision trains SmolLM2 in bf16 on this CPU (its probe, cached)."""
    from loralab.models import load_config
    from loralab.precision import model_shape, uses_bf16

    return uses_bf16("auto", model_shape(load_config(MODEL)))


def _loralab(spec: dict, data_dir: str, out: Path) -> tuple[Meter, object]:
    """Configurations C and D: `loralab train`, as the CLI runs it."""
    from loralab.config import build_config
    from loralab.train import train

    overrides = [
        f"model.name={MODEL}", "data.task=sst2", f"data.data_dir={data_dir}",
        f"data.max_train_examples={spec['examples']}", "data.max_eval_examples=16",
        f"train.method={spec['method']}", f"train.max_steps={spec['warmup'] + spec['steps']}",
        f"train.batch_size={BATCH}", "train.save_steps=10000", "train.logging_steps=10000",
        "tracking.log_every=10000", f"run.output_dir={out}",
    ]  # fmt: skip
    if spec["config"] == "D":
        # Compiled where `auto` compiles a long run (bf16, GPUs); auto would not at 33 steps.
        compiled = spec.get("device") == "cuda" or _bf16_here()
        overrides += ["lora.dropout=0.0", f"train.compile={str(compiled).lower()}"]
    if spec.get("device") == "cuda":
        overrides += ["train.precision=bf16"]
    meter = Meter(spec["warmup"], sync=spec.get("device") == "cuda")
    result = train(build_config(overrides=overrides), quiet=True, callbacks=[meter])
    meter.precision = result.summary["precision"]
    return meter, meter.trainer.model


def child(spec: dict) -> dict:
    """One configuration; returns its measurements."""
    from loralab.tracking import peak_memory_mb

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if spec["config"] in "AB":
            meter, model = _baseline(spec, spec["data_dir"], Path(tmp))
            precision = "fp32"
        else:
            meter, model = _loralab(spec, spec["data_dir"], Path(tmp))
            precision = meter.precision
    real_tps = meter.real / meter.t
    return {
        **{k: spec[k] for k in ("config", "method", "device")},
        "precision": precision,
        "measured_steps": meter.steps,
        "step_time_s": meter.t / meter.steps,
        "tokens_per_s_real": real_tps,
        "tokens_per_s_padded": meter.padded / meter.t,
        "padding_share": 1 - meter.real / meter.padded,
        "peak_rss_mb": peak_memory_mb(),
        "allocator": allocator.current(),
        "flops_per_real_token": _flops_per_token(model, spec["method"]),
        "model_gflops_per_s": _flops_per_token(model, spec["method"]) * real_tps / 1e9,
    }


# -- the parent -----------------------------------------------------------------------------------
def _run_child(spec: dict, must: bool = True) -> dict:
    """One configuration in its own process; a failure ends the benchmark, or with `must=False`
    comes back as a row holding the error (a lent GPU's few minutes keep what did run)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if spec["config"] == "C0":
        env["LORALAB_FUSED"] = "0"
    if spec["config"] not in ("A", "B"):  # loralab's own configurations run as `loralab` does
        lib = allocator.choose()[1]
        env = allocator.preload_env(env, lib) if lib is not None else env
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # on a GPU machine the CPU rows must stay on the CPU
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        if not must:
            return {**spec, "error": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
        raise SystemExit(f"configuration {spec['config']} ({spec['method']}) failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", help="GLUE SST-2 folder (train.tsv, dev.tsv); required")
    ap.add_argument("--steps", type=int, default=6, help="measured optimiser steps per config")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    ap.add_argument(
        "--examples", type=int, default=2000, help="training pool the batches come from"
    )
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--configs", default="A,B,C0,C,D")
    ap.add_argument(
        "--real-run",
        action="store_true",
        help="also time the README's main command end to end (SST-2, 4,000 examples, 1 epoch)",
    )
    ap.add_argument(
        "--gpu-only",
        action="store_true",
        help="only the GPU rows (C and D on CUDA), e.g. on a lent GPU machine with little time",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not args.data_dir:
        ap.error("--data-dir is required: the GLUE SST-2 folder (train.tsv, dev.tsv)")

    from loralab.precision import native_bf16

    data_dir = str(Path(args.data_dir).resolve())
    cpu_configs = [] if args.gpu_only else args.configs.split(",")
    peaks = {"fp32": matmul_peak("cpu", torch.float32), "bf16": matmul_peak("cpu", torch.bfloat16)}
    rows = []
    for method in args.methods.split(","):
        for config in cpu_configs:
            # Length-grouped batches (C, D) come longest first within each group of the sampler:
            # a window shorter than a group would measure only long batches, whose tokens are
            # cheaper per token. Those configurations measure one whole group at least.
            steps = args.steps if config in "AB" else max(args.steps, group_batches(args.examples))
            spec = dict(config=config, method=method, device="cpu", data_dir=data_dir,
                        steps=steps, warmup=args.warmup, examples=args.examples)  # fmt: skip
            rows.append(_run_child(spec))
            print(
                f"{method} {config}: {rows[-1]['tokens_per_s_real']:.1f} real tok/s",
                file=sys.stderr,
            )
    # The peak again at the end; the best of both readings is the machine's.
    peaks = {
        k: max(v, matmul_peak("cpu", getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[k])))
        for k, v in peaks.items()
    }
    for r in rows:
        r["mfu_fp32_peak"] = r["model_gflops_per_s"] / peaks["fp32"]
        r["mfu_bf16_peak"] = r["model_gflops_per_s"] / peaks["bf16"]
        r["mfu"] = r["model_gflops_per_s"] / peaks[r["precision"]]

    real = real_run(data_dir) if args.real_run else None

    gpu = {"skipped": "no CUDA GPU on this machine"}
    if torch.cuda.is_available():
        gpu_peak = matmul_peak("cuda", torch.bfloat16)
        gpu_rows = []
        for method in args.methods.split(","):
            for config in ("C", "D"):
                steps = max(args.steps * 4, group_batches(args.examples))  # a whole group, as above
                spec = dict(config=config, method=method, device="cuda", data_dir=data_dir,
                            steps=steps, warmup=args.warmup, examples=args.examples)  # fmt: skip
                r = _run_child(spec, must=False)  # D compiles: untested on CUDA so far
                if "error" not in r:
                    r["mfu"] = r["model_gflops_per_s"] / gpu_peak
                gpu_rows.append(r)
        gpu = {
            "device": torch.cuda.get_device_name(),
            "bf16_peak_gflops": gpu_peak,
            "rows": gpu_rows,
        }

    def ratio(method, a, b):
        by = {(r["method"], r["config"]): r["tokens_per_s_real"] for r in rows}
        return by.get((method, a), float("nan")) / by.get((method, b), float("nan"))

    rss = {(r["method"], r["config"]): r["peak_rss_mb"] for r in rows}
    report = {
        "model": MODEL,
        "batch_size": BATCH,
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": native_bf16("cpu"),
        "matmul_peak_gflops": peaks,
        "configs": CONFIGS,
        "rows": rows,
        "ratios": {
            f"{m}_{a}_over_{b}": ratio(m, a, b)
            for m in args.methods.split(",")
            for a, b in (("D", "A"), ("D", "B"), ("C", "B"), ("C", "C0"))
        },
        "fused_peak_rss": {  # C over C0: the memory loralab.fused saves, per method
            m: rss[(m, "C")] / rss[(m, "C0")]
            for m in args.methods.split(",")
            if (m, "C") in rss and (m, "C0") in rss
        },
        "lora_over_full_peak_rss": {
            c: rss[("lora", c)] / rss[("full", c)]
            for c in args.configs.split(",")
            if ("lora", c) in rss and ("full", c) in rss
        },
        "real_run": real,
        "gpu": gpu,
    }
    _table(report)
    print(json.dumps(report, indent=2))
    return 0


def real_run(data_dir: str) -> dict:
    """The README's main command, end to end: wall time, training tok/s, dev accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "loralab.cli", "train", "--task", "sst2", "--method", "lora",
            "--model", MODEL, "--data-dir", data_dir, "--max-train-examples", "4000",
            "--output-dir", tmp, "--quiet", "train.lr=5e-4",
        ]  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit("the real run failed")
        (summary,) = [json.loads(f.read_text()) for f in Path(tmp).glob("*/summary.json")]
    return {
        "command": f"loralab train --task sst2 --method lora --model {MODEL} --data-dir DIR "
        "--max-train-examples 4000 --output-dir OUT train.lr=5e-4",
        "wall_s": wall,
        "train_time_s": summary["train_time_s"],
        "tokens_per_s_real": summary["tokens_per_s"]["real"],
        "accuracy": summary["metrics"]["accuracy"],
        "precision": summary["precision"],
        "attention": (summary.get("attention") or {}).get("implementation"),
        "compile": summary.get("compile"),
    }


def _table(report: dict) -> None:
    print(
        f"\nmatmul peak GFLOP/s: fp32 {report['matmul_peak_gflops']['fp32']:.1f}, "
        f"bf16 {report['matmul_peak_gflops']['bf16']:.1f} (native bf16: {report['cpu_native_bf16']})",
        file=sys.stderr,
    )
    head = f"{'method':6} {'cfg':3} {'prec':5} {'real tok/s':>10} {'pad tok/s':>10} {'step s':>7} {'pad %':>6} {'RSS MB':>7} {'MFU':>6}"
    print(head, file=sys.stderr)
    for r in report["rows"]:
        print(
            f"{r['method']:6} {r['config']:3} {r['precision']:5} {r['tokens_per_s_real']:10.1f} "
            f"{r['tokens_per_s_padded']:10.1f} {r['step_time_s']:7.2f} {100 * r['padding_share']:6.1f} "
            f"{r['peak_rss_mb']:7.0f} {100 * r['mfu']:5.1f}%",
            file=sys.stderr,
        )
    if report.get("real_run"):
        r = report["real_run"]
        print(
            f"real run (README main command): {r['wall_s']:.0f} s wall, {r['train_time_s']:.0f} s "
            f"training at {r['tokens_per_s_real']:.0f} real tok/s, dev accuracy {r['accuracy']:.4f}",
            file=sys.stderr,
        )
    print(
        "ratios:",
        json.dumps({k: round(v, 2) for k, v in report["ratios"].items()}),
        file=sys.stderr,
    )


if __name__ == "__main__":
    raise SystemExit(main())
