"""Trainer callbacks: metrics to the run directory, a concise line per evaluation."""

from __future__ import annotations

from transformers import TrainerCallback

from .tracking import MetricsLog


class RunDirLogger(TrainerCallback):
    """Every Trainer log record (train loss, lr, eval metrics) goes to metrics.jsonl."""

    def __init__(self, log: MetricsLog, console=None):
        self.log = log
        self.console = console

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for k, v in logs.items():
            if k.startswith("eval_"):
                record[f"eval/{k[5:]}"] = v
            elif k in ("loss", "learning_rate", "grad_norm"):
                record[f"train/{k}"] = v
            else:
                record[k] = v
        self.log.log(record)
        if self.console is not None and any(k.startswith("eval_") for k in logs):
            shown = ", ".join(
                f"{k[5:]}={v:.4f}" for k, v in logs.items() if k.startswith("eval_") and isinstance(v, float)
            )
            self.console.print(f"[bold]eval[/] step {state.global_step}: {shown}")
