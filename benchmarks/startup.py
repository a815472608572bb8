"""Start-up cost of `loralab train`: command to first optimiser step, cold vs cached features.

Runs `loralab train` on the same data and tokenizer with a fresh feature cache: the first run
tokenises, the later ones (`--repeats`, 3 by default) load the saved features. Each run is one optimiser step on SmolLM2-135M
(model already in the cache) with an 8-example evaluation; its start-up runs from the command's
launch to the start of its first optimiser step (`first_step_at` in the run's summary.json).

Usage: python benchmarks/startup.py --data-dir ../shared/data/glue/sst2 [--examples 4000] [--repeats 3]
Prints JSON: per run the start-up seconds and whether tokenisation ran, and cached/cold (`cached`
is the cached run of median start-up, `cached_startup_s` lists them all: these shared machines
drift by seconds between runs a minute apart); and the median seconds a fresh interpreter takes
to import loralab.train (torch, transformers, PEFT, datasets), timed after each cached run both
as any program imports it (`imports_s`) and as the command does, with the collector paused
(`imports_paused_s`, `loralab.startup`): the floor under the start-up; and the cached start-up
beyond that floor.
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


def one_run(data_dir: str, examples: int, out: Path, features: Path, model: str) -> dict:
    cmd = [
        sys.executable, "-m", "loralab.cli", "train", "--task", "sst2", "--model", model,
        "--data-dir", data_dir, "--max-train-examples", str(examples), "--max-eval-examples", "8",
        "--output-dir", str(out), "--quiet", "train.max_steps=1", "train.save_steps=1000",
    ]  # fmt: skip
    # One folder per tokenised (split, inputs) key: a new folder means this run tokenised.
    # (Files inside old folders don't count: datasets writes its own cache files there.)
    before = set(features.iterdir()) if features.exists() else set()
    launched, t = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit("loralab train failed")
    (run,) = [p for p in out.iterdir() if p.is_dir() and p not in one_run.seen]
    one_run.seen.add(run)
    summary = json.loads((run / "summary.json").read_text())
    wrote = len(set(features.iterdir()) - before)
    return {
        "wall_s": wall,
        # command to first step: the run records when its first optimiser step began
        "startup_s": summary["first_step_at"] - launched,
        "train_time_s": summary["train_time_s"],
        "tokenised": wrote > 0,  # the cache gained files: this run tokenised
    }


one_run.seen = set()


def import_seconds(
    module: str = "loralab.train", env: dict | None = None, paused: bool = False
) -> float:
    """Seconds a fresh interpreter takes to import `module` (loralab.train: torch, transformers,
    PEFT and datasets, the floor under any start-up loralab itself can cut); `paused`: with the
    cyclic collector off, as `loralab train` imports them."""
    pause = "import gc; gc.disable(); " if paused else ""
    code = f"{pause}import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"importing {module} failed")
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3, help="cached runs (the median is reported)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    from loralab.models import cache_dir

    with tempfile.TemporaryDirectory() as tmp:
        # A fresh cache whose models/ is the user's (the model is already converted there), so
        # only the features start empty.
        root = Path(tmp) / "cache"
        root.mkdir()
        (root / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
        os.environ["LORALAB_CACHE"] = str(root)
        cache = root / "features"
        out = Path(tmp) / "runs"
        out.mkdir()
        data_dir = str(Path(args.data_dir).resolve())
        cold = one_run(data_dir, args.examples, out, cache, args.model)
        warm, imports, paused = [], [], []
        for _ in range(args.repeats):
            warm.append(one_run(data_dir, args.examples, out, cache, args.model))
            imports.append(import_seconds())
            paused.append(import_seconds(paused=True))
    startups = [w["startup_s"] for w in warm]
    median = sorted(warm, key=lambda w: w["startup_s"])[(len(warm) - 1) // 2]
    imports = sorted(imports)[(len(imports) - 1) // 2]
    paused = sorted(paused)[(len(paused) - 1) // 2]
    report = {
        "model": args.model,
        "train_examples": args.examples,
        "cold": cold,
        "cached": median,
        "cached_startup_s": startups,
        "startup_saved_s": cold["startup_s"] - median["startup_s"],
        # what the cached start-up spends beyond importing its libraries (as it imports them)
        "imports_s": imports,
        "imports_paused_s": paused,
        "cached_beyond_imports_s": median["startup_s"] - paused,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
