"""Study throughput per process layout: SST-2 LoRA runs (1,000 examples) per hour on this machine.

A study is many independent runs, so what counts is runs finished per hour, not the speed of one
run. On a small machine the layouts compete: one worker using every core (`--workers 1`), or one
1-thread worker per core (`--workers auto` on a CPU). Each layout runs the same study through
`loralab study` itself, so its workers start their points the way a real study does (forked from
a server with the imports done, a finished worker lending its core): SmolLM2-135M, SST-2, 1,000
training examples, one epoch, the full dev set, one point per learning rate. Before the layouts,
one untimed point (its own study in the same Optuna storage) fills the feature and probe caches
and records the point's peak memory, so that no layout pays for the caches and each starts as a
study does once it knows what its points need: on a fresh study a worker waits for the first
point of each task and method to finish before starting a second beside it
(`loralab.study.memory`), which on a study of a few points would hide the layouts' difference.
`--oversubscribed` adds the mistake a study avoids, several workers that each use every core
(separate `loralab train` processes: `loralab study` never starts them). Nothing else should run
meanwhile.

Usage:
  python benchmarks/study_throughput.py --data-dir ../shared/data/glue/sst2 [--runs 4]
Prints a table to stderr and JSON to stdout: per layout the wall time, runs/hour, the precision
each run chose, each run's accuracy and training speed, and the ratio to one worker using every
core.
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

import yaml

LRS = (3e-4, 5e-4, 7e-4, 1e-3, 2e-4, 4e-4, 6e-4, 8e-4)  # one point each; all cost the same


def _env(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _train_cmd(out: Path, data_dir: str, examples: int, model: str, lr: float) -> list[str]:
    """One SST-2 LoRA run as a separate process (the oversubscribed layout)."""
    return [
        sys.executable, "-m", "loralab.cli", "train", "--task", "sst2", "--model", model,
        "--method", "lora", "--data-dir", data_dir, "--max-train-examples", str(examples),
        "--output-dir", str(out), "--quiet", f"train.lr={lr}", "train.seed=42",
        "train.save_steps=100000",
    ]  # fmt: skip


def spec(runs: int, data_dir: str, examples: int, model: str, lrs=LRS) -> dict:
    """A one-task study whose `runs` points differ only in their learning rate."""
    if not 1 <= runs <= len(lrs):
        raise SystemExit(f"--runs must be 1..{len(lrs)}, got {runs}")
    return {
        "name": "throughput",
        "base": {"model": {"name": model}, "train": {"save_steps": 100000}},
        "tasks": {"sst2": {"data_dir": data_dir, "max_train_examples": examples}},
        "methods": ["lora"],
        "lr": {"lora": list(lrs[:runs])},
        "seeds": [42],
    }


def summaries(folder: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(folder.rglob("summary.json"))]


def run_study(name: str, workers: str, plan: dict, tmp: Path):
    """Run the study `plan` as `name` with `--workers workers` (the storage in `tmp` is shared by
    every study of the benchmark); returns wall seconds and the points' summaries."""
    out = tmp / name
    spec_file = tmp / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(plan))
    cmd = [sys.executable, "-m", "loralab.cli", "study", str(spec_file), "--output-dir", str(out),
           "--storage", f"sqlite:///{tmp / 'studies.db'}", "--study", name, "--workers", workers,
           "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(None), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"the study with --workers {workers} failed (exit {p.returncode})")
    return wall, summaries(out / "runs")


def run_processes(workers: int, threads: int, runs: int, data_dir, examples, model, tmp: Path):
    """`runs` separate `loralab train` processes, `workers` at a time with `threads` each."""
    queue, active = list(range(runs)), []
    t0 = time.perf_counter()
    while queue or active:
        while queue and len(active) < workers:
            i = queue.pop(0)
            cmd = _train_cmd(tmp / f"p{workers}x{threads}-{i}", data_dir, examples, model, LRS[i])
            active.append(subprocess.Popen(cmd, env=_env(threads), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True))  # fmt: skip
        time.sleep(0.5)
        for p in [p for p in active if p.poll() is not None]:
            active.remove(p)
            if p.returncode != 0:
                sys.stderr.write(p.stderr.read()[-3000:])
                raise SystemExit("a training run failed")
    wall = time.perf_counter() - t0
    return wall, [s for i in range(runs) for s in summaries(tmp / f"p{workers}x{threads}-{i}")]


def row(name: str, workers: int, threads: int, wall: float, runs: list[dict]) -> dict:
    return {
        "layout": name, "workers": workers, "threads_per_worker": threads, "runs": len(runs),
        "wall_s": wall, "runs_per_hour": len(runs) * 3600 / wall,
        "precision": sorted({s.get("precision") for s in runs}),
        "accuracy": [s["metrics"]["accuracy"] for s in runs],
        "train_tokens_per_s_real": [s["tokens_per_s"]["real"] for s in runs],
        "run_wall_s": [s["wall_time_s"] for s in runs],
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="GLUE SST-2 folder (train.tsv, dev.tsv)")
    ap.add_argument("--runs", type=int, default=0, help="points per layout (default: 2 × cores)")
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--oversubscribed", action="store_true",
                    help="also time separate every-core processes, one per core (slow)")  # fmt: skip
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    runs = args.runs or 2 * cores
    data_dir = str(Path(args.data_dir).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_study("warmup", "1", spec(1, data_dir, args.examples, args.model, (1e-4,)), tmp)
        plan = spec(runs, data_dir, args.examples, args.model)
        layouts = [(f"1x{cores} (--workers 1: one worker, every core)", "1", 1, cores)]
        if cores > 1:
            layouts.append((f"{cores}x1 (--workers auto: one 1-thread worker per core)", "auto",
                            cores, 1))  # fmt: skip
        for name, flag, workers, threads in layouts:
            wall, done = run_study(f"workers-{flag}", flag, plan, tmp)
            rows.append(row(name, workers, threads, wall, done))
            print(f"{name}: {wall:.0f} s for {runs} runs", file=sys.stderr)
        if args.oversubscribed and cores > 1:
            name = f"{cores}x{cores} (oversubscribed separate processes)"
            wall, done = run_processes(cores, cores, runs, data_dir, args.examples, args.model, tmp)
            rows.append(row(name, cores, cores, wall, done))
            print(f"{name}: {wall:.0f} s for {runs} runs", file=sys.stderr)
    base = rows[0]["runs_per_hour"]
    for r in rows:
        r["over_one_worker"] = r["runs_per_hour"] / base
    best = max(rows, key=lambda r: r["runs_per_hour"])
    print(json.dumps({"cores": cores, "model": args.model, "examples": args.examples,
                      "rows": rows, "fastest": best["layout"]}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
