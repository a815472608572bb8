"""Study throughput per process layout: SST-2 LoRA runs (1,000 examples) per hour on this machine.

A study is many independent runs, so what counts is runs finished per hour, not the speed of one
run. On a small machine the layouts compete: one worker using every core, one worker per core
with one thread each, or (the mistake) several workers each using every core. Each layout runs
the same number of `loralab train` runs (SmolLM2-135M, SST-2, 1,000 training examples, one
epoch, full dev set), started together as its workers would; its throughput is runs ÷ wall time.
Nothing else should run meanwhile.

Usage:
  python benchmarks/study_throughput.py --data-dir ../shared/data/glue/sst2 [--runs 2]
Prints a table to stderr and JSON to stdout: per layout the wall time, runs/hour, the
precision each run chose, and the ratio to one worker using every core.
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


def layouts(cores: int) -> dict[str, tuple[int, int]]:
    """name -> (parallel workers, threads per worker)."""
    out = {f"1x{cores} (one worker, every core)": (1, cores)}
    if cores > 1:
        out[f"{cores}x1 (one 1-thread worker per core)"] = (cores, 1)
        out[f"{cores}x{cores} (oversubscribed)"] = (cores, cores)
    return out


def run_layout(workers: int, threads: int, runs: int, data_dir: str, examples: int, model: str):
    """Start `runs` trainings on `workers` parallel slots; returns wall seconds and summaries."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        queue = list(range(runs))
        active: list[subprocess.Popen] = []
        t0 = time.perf_counter()
        while queue or active:
            while queue and len(active) < workers:
                i = queue.pop(0)
                cmd = [
                    sys.executable, "-m", "loralab.cli", "train", "--task", "sst2", "--model", model,
                    "--method", "lora", "--data-dir", data_dir, "--max-train-examples", str(examples),
                    "--output-dir", str(Path(tmp) / f"w{i}"), "--quiet", "train.lr=5e-4",
                    f"train.seed={42 + i}", "train.save_steps=100000",
                ]  # fmt: skip
                active.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, text=True))  # fmt: skip
            time.sleep(0.5)
            for p in [p for p in active if p.poll() is not None]:
                active.remove(p)
                if p.returncode != 0:
                    sys.stderr.write(p.stderr.read()[-3000:])
                    raise SystemExit("a training run failed")
        wall = time.perf_counter() - t0
        summaries = [json.loads(f.read_text()) for f in Path(tmp).glob("w*/*/summary.json")]
    return wall, summaries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="GLUE SST-2 folder (train.tsv, dev.tsv)")
    ap.add_argument("--runs", type=int, default=0, help="runs per layout (default: cores)")
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    runs = args.runs or cores
    data_dir = str(Path(args.data_dir).resolve())
    rows = []
    for name, (workers, threads) in layouts(cores).items():
        wall, summaries = run_layout(workers, threads, runs, data_dir, args.examples, args.model)
        rows.append({
            "layout": name, "workers": workers, "threads_per_worker": threads, "runs": runs,
            "wall_s": wall, "runs_per_hour": runs * 3600 / wall,
            "precision": sorted({s.get("precision") for s in summaries}),
            "accuracy": [s["metrics"]["accuracy"] for s in summaries],
            "train_tokens_per_s_real": [s["tokens_per_s"]["real"] for s in summaries],
        })  # fmt: skip
        print(f"{name}: {wall:.0f} s for {runs} runs, {rows[-1]['runs_per_hour']:.1f} runs/h",
              file=sys.stderr)  # fmt: skip
    base = rows[0]["runs_per_hour"]
    for r in rows:
        r["over_one_worker"] = r["runs_per_hour"] / base
    best = max(rows, key=lambda r: r["runs_per_hour"])
    print(json.dumps({"cores": cores, "model": args.model, "examples": args.examples,
                      "rows": rows, "fastest": best["layout"]}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
