"""What a run's summary.json records about it: provenance, data, parameters, and the identity
by which runs are pooled."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from . import allocator, distributed, precision, quantization, tracking
from .config import ExperimentConfig, to_dict
from .data import FEATURES_VERSION, Splits
from .identity import identity
from .models import canonical, untrained_modules
from .redact import mask_secrets
from .tasks import Task

ENV_WORKERS = "LORALAB_WORKERS"  # set by a study's workers: how many run side by side


def process_layout(callbacks: list | None = None) -> dict:
    """The layout this process trains in: worker processes side by side (a study's), threads,
    cores, heap allocator (peak memory depends on it); a callback with a `layout_record()`
    method adds its own (a study's core lender: the idle cores the run was lent)."""
    import torch

    out = {
        "workers": int(os.environ.get(ENV_WORKERS, "1") or 1),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "allocator": allocator.current(),
    }
    for cb in callbacks or []:
        if callable(getattr(cb, "layout_record", None)):
            out.update(cb.layout_record())
    return out


def base_summary(
    cfg: ExperimentConfig, run_dir: Path, params: dict, splits: Splits, model, task: Task,
    layout: dict | None = None, heads: list[str] | None = None,
) -> dict:  # fmt: skip
    """The summary.json of a run as it starts (status `running`); `train` completes it.
    `layout`: `process_layout` of the run's callbacks (default: of none). `heads`: the modules
    trained in full beside the adapters (`load_model`'s new_modules)."""
    ran, processes = _precision_name(cfg), distributed.world_size()
    retrained = [m for m in heads or () if m in untrained_modules(cfg.model.name)]
    return {
        "status": "running",
        "run_dir": str(run_dir),
        "task": cfg.data.task,
        "method": cfg.train.method,
        "model": cfg.model.name,
        "model_source": _model_source(cfg.model.name),
        "head": cfg.model.head,
        "seed": cfg.train.seed,
        "lr": cfg.lr,
        "lora": to_dict(cfg.lora) if cfg.train.method == "lora" else None,
        "examples": {"train": len(splits.train_raw), "eval": len(splits.eval_raw)},
        "features": {"train": len(splits.train), "eval": len(splits.eval)},
        "max_length": splits.max_length,
        "features_version": FEATURES_VERSION,
        "data_fingerprint": splits.fingerprint,
        "majority_baseline": task.majority_baseline(splits.eval_raw),
        "identity": identity(cfg, splits, ran, processes, retrained),
        "params": params,
        "precision": ran,
        "processes": processes,  # under torchrun: data-parallel processes
        "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * processes,
        "layout": layout or process_layout(),  # worker processes side by side, threads
        "param_dtypes": precision.dtypes(model),
        "quantization": quantization.describe(model, cfg.model.quantization),
        "versions": tracking.versions(),
        "hardware": tracking.hardware(),
        "git_commit": tracking.git_commit(),
        # Credentials on the command line (--storage URL passwords, tokens) never get stored.
        "command": mask_secrets(" ".join(sys.argv)),
    }


def _model_source(name: str) -> dict:
    return canonical(name)


def _precision_name(cfg: ExperimentConfig) -> str:
    return "bf16" if precision.uses_bf16(cfg.train.precision) else "fp32"


def resolved_config(cfg: ExperimentConfig, max_length: int, attention: str | None = None,
                    compile: bool | None = None) -> ExperimentConfig:  # fmt: skip
    """A copy of `cfg` with the values left to defaults (lr, max_length, precision) and the
    kernels chosen for `auto` (`attention`, `compile`; None: left as they are) filled in, as the
    run folder's config.yaml records them; loading it back (a resume: a new probe or a cold
    compile cache would choose again, and compiled layers round differently) gives the same run."""
    train_cfg = replace(cfg.train, lr=cfg.lr, precision=_precision_name(cfg))
    if compile is not None and cfg.train.compile == "auto":
        train_cfg = replace(train_cfg, compile=bool(compile))
    model = cfg.model
    if attention in ("sdpa", "eager") and model.attention == "auto":
        model = replace(model, attention=attention)
    return replace(cfg, model=model, train=train_cfg, data=replace(cfg.data, max_length=max_length))


def metrics_text(metrics: dict) -> str:
    """`accuracy=0.8532, f1=0.8711`: a run's float metrics as its console lines show them."""
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def headline(summary: dict, steps: int) -> list[str]:
    """The two lines a run prints before its first step, from its starting summary: what
    trains, and what was chosen for it and why (`auto` decides by measurement, so a reader sees
    it before the run, not only in summary.json afterwards). E.g.
    `run: sst2 · lora r=8 α=16 standard · smollm2-135m · 461,952 of 134,976,960 weights trained
    (0.342%) · 3,668 train / 408 dev examples · 250 steps` and `chose: bf16 (measured: 2.0× fp32)
    · eager attention (measured: 1.8× sdpa) · layers not compiled: 250 steps < 600 · 1 thread,
    2 cores`."""
    lora, p, ex = summary.get("lora"), summary["params"], summary["examples"]
    method = summary["method"]
    if lora:
        target = lora["target"]
        method += f" r={lora['r']} α={float(lora['alpha']):g} {'+'.join(target) if isinstance(target, list) else target}"  # fmt: skip
    what = [summary["task"], method, summary["model"],
            f"{p['trainable']:,} of {p['total']:,} weights trained ({p['trainable_share_pct']:.3g}%)",
            f"{ex['train']:,} train / {ex['eval']:,} dev examples", f"{steps:,} steps"]  # fmt: skip
    prec = summary.get("precision_decision") or {}
    att = summary.get("attention") or {}
    comp = summary.get("compile") or {}
    layout = summary.get("layout") or {}
    threads, kernel = layout.get("threads", 1), att.get("implementation", "default")
    how = [
        _chosen(summary["precision"], "", prec, rival={"bf16": "fp32", "fp32": "bf16"}),
        _chosen(kernel, " attention", att, rival={"eager": "sdpa", "sdpa": "eager"}),
        ("compiled layers" if comp.get("compile") else "layers not compiled")
        + (f": {comp['reason']}" if comp.get("reason") else ""),
        f"{threads} thread{'s' * (threads != 1)}, {layout.get('cores', '?')} cores"
        + (f", {layout['workers']} workers side by side" if layout.get("workers", 1) > 1 else ""),
    ]
    return ["run: " + " · ".join(what), "chose: " + " · ".join(how)]


def _chosen(name: str, noun: str, decision: dict, rival: dict) -> str:
    """`bf16 (measured: 2.0× fp32)` where the decision's probe timed `name` against its rival
    (probe keys `<name>_s`), else `name (reason)`; `noun` follows the name."""
    probe, reason, other = decision.get("probe") or {}, decision.get("reason"), rival.get(name)
    ours, theirs = probe.get(f"{name}_s"), probe.get(f"{other}_s")
    if reason == "measured" and ours and theirs:
        return f"{name}{noun} (measured: {theirs / ours:.1f}× {other})"
    return f"{name}{noun} ({reason})" if reason else f"{name}{noun}"
