"""What compiled layers (`train.compile`) cost and give on one real run: eager, cold, warm.

Runs the README's main command (SST-2, 4,000 examples, lr 5e-4; LoRA unless --method full) three
times, one after another: eager (`train.compile=false`), compiled with an empty inductor cache
(a fresh TORCHINDUCTOR_CACHE_DIR), and compiled again on that cache. Per run: wall and training
seconds, real tok/s, dev accuracy, and, from the run's metrics.jsonl (a loss every 10 steps),
the seconds of the first `--head` steps (the compile happens in the first) and of the steps after
them up to the last logged one (the steady state). Ratios are against the eager run.

Usage:
  python benchmarks/compile_cost.py --data-dir ../shared/data/glue/sst2 [--method lora]
Prints JSON to stdout, one line per run to stderr.
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

MODEL = os.environ.get("LORALAB_BENCH_MODEL", "smollm2-135m")  # tiny-llama: a smoke test


def windows(rows: list[dict], head: int) -> dict:
    """Seconds from the start of training to step `head`, and from `head` to the last logged
    step, out of metrics.jsonl rows (step 0 is the start; loss rows carry the logged steps)."""
    start = next(r["time"] for r in rows if r.get("step") == 0)
    logged = sorted((r["step"], r["time"]) for r in rows if "train/loss" in r)
    at_head = next((t for s, t in logged if s >= head), None)
    if at_head is None or logged[-1][0] <= head:
        raise SystemExit(f"the run logged no loss after step {head}: too few steps for --head")
    last_step, last_t = logged[-1]
    return {
        "head_steps": head,
        "head_s": at_head - start,
        "steady_steps": last_step - head,
        "steady_s": last_t - at_head,
    }


def one_run(label: str, args, out: Path, env: dict, compile_: bool) -> dict:
    cmd = [
        sys.executable, "-m", "loralab.cli", "train", "--task", "sst2", "--method", args.method,
        "--model", MODEL, "--data-dir", args.data_dir, "--max-train-examples", str(args.examples),
        "--output-dir", str(out / label), "--quiet", f"train.lr={args.lr}",
        f"train.compile={str(compile_).lower()}", *args.override,
    ]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"the {label} run failed")
    (run,) = (out / label).iterdir()
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = {
        "run": label,
        "compile": summary["compile"],
        "wall_s": wall,
        "train_time_s": summary["train_time_s"],
        "tokens_per_s_real": summary["tokens_per_s"]["real"],
        "metrics": summary["metrics"],
        **windows(rows, args.head),
    }
    print(json.dumps({k: v for k, v in got.items() if k != "metrics"}), file=sys.stderr)
    return got


def report(runs: dict) -> dict:
    """The runs and each compiled run's figures over the eager run's."""
    eager = runs["eager"]
    ratios = {
        label: {
            "wall": r["wall_s"] / eager["wall_s"],
            "train_time": r["train_time_s"] / eager["train_time_s"],
            "steady_speedup": (eager["steady_s"] / eager["steady_steps"])
            / (r["steady_s"] / r["steady_steps"]),
            "head_extra_s": r["head_s"] - eager["head_s"],
        }
        for label, r in runs.items()
        if label != "eager"
    }
    return {"runs": runs, "over_eager": ratios}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="GLUE SST-2 folder (train.tsv, dev.tsv)")
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--lr", default="5e-4")
    ap.add_argument("--head", type=int, default=30, help="steps counted as the compile's")
    ap.add_argument("--override", nargs="*", default=[], help="more config overrides")
    args = ap.parse_args(argv)
    args.data_dir = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor")}
        runs = {"eager": one_run("eager", args, out, env, False)}
        runs["cold"] = one_run("cold", args, out, env, True)
        runs["warm"] = one_run("warm", args, out, env, True)
    print(json.dumps({"model": MODEL, "method": args.method, **report(runs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
