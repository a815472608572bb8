"""What a study point's run folder says while it trains or after: the finished run's training
CPU time, the logged progress, the newest readable checkpoint (its share of training and the
CPU time up to it), and whether the worker that holds the point on this host is gone."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..rundir import (
    CHECKPOINT_DIR,
    LOCKS_DIR,
    LOGS_DIR,
    LOSS_FILE,
    METRICS_FILE,
    RUNS_DIR,
    SUMMARY_FILE,
)
from ..tracking import machine_name
from .leases import lock_here
from .records import final_loss, main_metric_value, record_from_summary
from .reuse import FINISHED

# A point's log line when its run is lent idle cores or gives them back (study.spare_cores);
# `--status` reads the last one.
LENT_LOG = "loralab: spare cores: "
FINAL = ("done", "diverged", "no metric")  # the point states that need no more training


def finished_value(results: Path, key: str) -> float | None:
    """The dev value a worker would record for the finished run folder RUNS_DIR/`key` when it
    reuses it (its task's main metric; -inf: diverged or no value); None: not finished."""
    try:
        summary = json.loads((results / RUNS_DIR / key / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") not in FINISHED:
        return None
    value = main_metric_value(record_from_summary(summary)) if summary.get("task") else None
    ok = (
        summary["status"] == "completed"
        and isinstance(value, (int, float))
        and math.isfinite(value)
    )
    return float(value) if ok else -math.inf


def outside_training(summary: dict) -> tuple[float | None, float | None]:
    """(wall s before the first step, wall s of the final evaluation) of a finished run. The
    first is what its wall time leaves beside training and that evaluation, known only for a
    run trained in one attempt (a resumed one's wall time holds every attempt's start-up)."""
    wall, train, final = (summary.get(k) for k in ("wall_time_s", "train_time_s", "eval_time_s"))
    if not all(isinstance(x, (int, float)) for x in (wall, train, final)):
        return None, final if isinstance(final, (int, float)) else None
    setup = wall - train - final
    return (setup if setup >= 0 and not summary.get("resumed_from") else None), final


def read_run(ps, results: Path, key: str, cfg) -> None:
    """Fill point status `ps` (see status.PointStatus) from its run folder: training CPU time
    (finished), else logged progress, the last checkpoint and its CPU time, and whether its
    worker on this host is gone."""
    run = results / RUNS_DIR / key
    try:
        summary = json.loads((run / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = {}  # not finished, a reused point from elsewhere, or a summary being written
    if ps.state in FINAL or summary.get("status") in FINISHED:  # a finished folder is reused
        ps.cpu_s = summary.get("train_cpu_time_s")
        ps.wall_s = summary.get("train_time_s")
        ps.loss = final_loss(summary)
        ps.setup_s, ps.eval_s = outside_training(summary)
        ps.machine = machine_name(summary.get("hardware") or {})
        start = summary.get("first_step_at")
        ps.started_at = float(start) if isinstance(start, (int, float)) else None
        if ps.state not in FINAL:  # an ablation's base point, a grid extended under a new name
            ps.reusable = True
            ps.detail = "its run folder is finished: reused, not retrained, when claimed"
        return
    if not run.is_dir():
        return
    max_steps, ckpt_step = cfg.train.max_steps, None
    ckpts = sorted(
        (c for c in (run / CHECKPOINT_DIR).glob("checkpoint-*") if c.name[11:].isdigit()),
        key=lambda c: int(c.name[11:]),
    )
    for c in reversed(ckpts):  # the newest readable one (a checkpoint being saved has no state)
        try:
            state = json.loads((c / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        max_steps, ckpt_step = state.get("max_steps") or max_steps, state.get("global_step")
        ps.resumes_wall_s, ps.resumes_cpu_s = _checkpoint_times(c)
        break
    if ckpt_step is not None and max_steps and max_steps > 0:
        ps.resumes_at = ckpt_step / max_steps
    # Read whole: between two evaluations of a long run lie more lines than a tail holds.
    try:
        lines = (run / METRICS_FILE).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    ps.last_eval = _last_eval(lines, ps.metric)
    last = _last_logged(lines)
    if last:
        if max_steps and max_steps > 0 and "step" in last:
            ps.progress = min(1.0, last["step"] / max_steps)
        elif "epoch" in last and cfg.train.epochs > 0:
            ps.progress = min(1.0, last["epoch"] / cfg.train.epochs)
        if "time" in last:
            ps.logged_ago_s = max(0.0, time.time() - last["time"])
    if ps.state == "running":
        ps.lent_threads = lent_threads(results / LOGS_DIR / f"{key}.log")
    if ps.state == "running" and lock_here(results / LOCKS_DIR / f"{key}.lock") == "free":
        ps.detail = "stale: no worker on this host holds it; the next worker retries it"


def _checkpoint_times(ckpt: Path) -> tuple[float | None, float | None]:
    """Training (wall, CPU) s up to `ckpt` (recorded by loralab since 2026-12-02; None before)."""
    try:
        state = json.loads((ckpt / LOSS_FILE).read_text())
        values = [state.get("train_time_s"), state.get("train_cpu_time_s")]
    except (OSError, ValueError, AttributeError):
        return None, None
    wall, cpu = (float(v) if isinstance(v, (int, float)) else None for v in values)
    return wall, cpu


def _tail(path: Path, size: int = 65536) -> list[str]:
    """The last lines of an appended-to file (the first may be cut); [] when unreadable."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            return fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def lent_threads(log: Path) -> int | None:
    """The threads a running point's current attempt trains on while lent idle cores (the last
    `LENT_LOG` line of its log, after the attempt's `===` header), or None when not lent."""
    for line in reversed(_tail(log)):
        if line.startswith("=== "):  # worker._spawn's header: the lines above are older attempts
            return None
        if line.startswith(LENT_LOG):
            threads, why = line[len(LENT_LOG) :].split(" ", 1)
            return int(threads) if "lent" in why and threads.isdigit() else None
    return None


def _last_eval(lines: list[str], metric: str) -> dict | None:
    """The newest dev evaluation during training in metrics.jsonl's `lines`: {step, value (the
    main `metric`, or None), loss (or None)}; None before the first."""
    for line in reversed(lines):
        if '"eval/' not in line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the line being written
        if not isinstance(row, dict) or "step" not in row:
            continue
        value, loss = (row.get(k) for k in (f"eval/{metric}", "eval/loss"))
        value, loss = (float(v) if isinstance(v, (int, float)) else None for v in (value, loss))
        if value is not None or loss is not None:
            return {"step": row["step"], "value": value, "loss": loss}
    return None


def _last_logged(lines: list[str]) -> dict | None:
    """The last training log line with a step in metrics.jsonl's `lines` (appended line by
    line: the last may be cut)."""
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a cut first line or one being written
        if isinstance(row, dict) and "epoch" in row:
            return row
    return None
