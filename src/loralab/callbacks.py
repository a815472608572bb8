"""Trainer callbacks: metrics to the tracker, adapter statistics, efficiency, verification."""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import has_length

from . import accounting, analysis, tracking
from .tracking import Tracker

# Per-layer keys kept small: the full table is `loralab analyze`'s job.
_PER_MODULE_ADAPTER = ("A_norm", "B_norm", "delta_fro_norm")
_PER_MODULE_RANK = ("effective_rank", "rank_utilisation")
# Means per module kind and over all modules.
_MEAN_ADAPTER = ("A_norm", "B_norm", "delta_fro_norm", "delta_spectral_norm", "delta_mean",
                 "delta_std")  # fmt: skip
_MEAN_RANK = ("effective_rank", "rank_utilisation", "stable_rank")


def adapter_records(model) -> dict[str, float]:
    """`lora_adapters/*` and `lora_rank/*` for a PEFT model: per module, by kind, overall."""
    out: dict[str, float] = {}
    try:
        factors = analysis.lora_factors(model)
    except analysis.UnsupportedVariant:
        return out  # a variant the factor statistics would misdescribe: log none
    rows = []
    for f in factors:
        stats = analysis.module_stats(f)
        rows.append((f.name, stats))
        for k in _PER_MODULE_ADAPTER:
            out[f"lora_adapters/{f.name}/{k}"] = stats[k]
        for k in _PER_MODULE_RANK:
            out[f"lora_rank/{f.name}/{k}"] = stats[k]
    if not rows:
        return out
    # "all" sums kind by kind (as it always has: the same float rounding); a NaN statistic
    # (a diverged run) must show in its mean, not be skipped.
    keys = _MEAN_ADAPTER + _MEAN_RANK
    by_kind = [row for group in analysis.group_by_kind(rows).values() for row in group]
    groups = analysis.kind_means(by_kind, keys, kind=lambda _: "all", finite_only=False)
    groups |= dict(sorted(analysis.kind_means(rows, keys, finite_only=False).items()))
    for group, means in groups.items():
        for k in _MEAN_ADAPTER:
            out[f"lora_adapters/{group}/{k}_mean"] = means[k]
        for k in _MEAN_RANK:
            out[f"lora_rank/{group}/{k}_mean"] = means[k]
    return out


def efficiency_records(params: dict, prefix: str = "efficiency/") -> dict[str, float]:
    """`accounting.parameter_counts` as flat scalar records: `efficiency/total`, …,
    `efficiency/by_module/q/lora` (nested dicts become path segments)."""
    out: dict[str, float] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out |= efficiency_records(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out


class TokenCounts:
    """Tokens trained on so far (real = not padding). The trainer counts; callbacks read."""

    def __init__(self) -> None:
        self.padded = 0
        self._real = 0
        self._pending = None  # real tokens of batches on a GPU, summed there and not yet read
        # Seconds of training's wall time spent evaluating and saving checkpoints (the trainer
        # adds them): throughput figures leave them out, so tokens/s is the steps' own.
        self.paused_s = 0.0

    @property
    def real(self) -> int:
        if self._pending is not None:  # a host sync per read (log steps), not per step
            self._real += int(self._pending)
            self._pending = None
        return self._real

    def count(self, attention_mask) -> None:
        if attention_mask is None:
            return
        self.padded += attention_mask.numel()
        if attention_mask.device.type == "cpu":
            self._real += int(attention_mask.sum())
        else:  # reading a GPU sum every step would stall the queue of work the CPU runs ahead
            total = attention_mask.sum()
            self._pending = total if self._pending is None else self._pending + total


class TrackingCallback(TrainerCallback):
    """Every Trainer log record, plus live adapter statistics and frozen-base checks.

    `base_checksum` is taken before training; under LoRA the base must stay bit-identical.
    """

    def __init__(self, tracker: Tracker, log_every: int, efficiency: dict, base_checksum: str | None,
                 tokens: TokenCounts, console=None):  # fmt: skip
        self.tracker = tracker
        self.tokens = tokens
        self.log_every = log_every
        self.efficiency = efficiency
        self.base_checksum = base_checksum
        self.console = console
        self._last = (time.time(), 0, 0, 0, 0.0)
        self._efficiency_logged = False
        self._begin_step = 0

    # -- periodic records ------------------------------------------------------------------
    def _verification(self, model) -> dict:
        if self.base_checksum is None:
            return {}
        frozen = accounting.frozen_base_report(model)["base_frozen"]
        same = accounting.checksum(accounting.base_parameters(model)) == self.base_checksum
        return {"verification/base_frozen": frozen, "verification/base_unchanged": same}

    def _adapter(self, model) -> dict:
        return adapter_records(model) if self.base_checksum is not None else {}

    def _no_step(self, state) -> bool:
        """Resumed from the final checkpoint: this attempt trained no step, and the attempt that
        saved it logged the step's records and the closing figures (kept in metrics.jsonl)."""
        return 0 < self._begin_step == state.global_step

    def _log_checks(self, model, step: int) -> None:
        record = {**self._verification(model), **self._adapter(model)}
        if record:  # full fine-tuning has neither: no empty {time, step} line
            self.tracker.log(record, step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._begin_step = state.global_step
        self._last = (time.time(), state.global_step, *self._tokens(), self.tokens.paused_s)
        if state.global_step > 0:  # resumed: these were logged before the checkpoint, and kept
            return
        record = efficiency_records(self.efficiency)
        self.tracker.log(
            {**record, **self._verification(model), **self._adapter(model)}, state.global_step
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # The run's final evaluation follows the last step: a periodic one there (eval_steps
        # dividing the run's length) would score the same model twice.
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_evaluate = False
        if state.global_step % self.log_every == 0:
            self._log_checks(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._no_step(state):
            return
        if state.global_step % self.log_every != 0:
            self._log_checks(model, state.global_step)
        if not self._efficiency_logged:  # a run shorter than logging_steps: one record at the end
            record = self._efficiency_since_last(state.global_step)
            if record:
                self.tracker.log(record, state.global_step)

    # -- the Trainer's own logs (loss, lr, eval) + efficiency ------------------------------
    def _tokens(self) -> tuple[int, int]:
        return self.tokens.real, self.tokens.padded

    def _efficiency_since_last(self, step: int) -> dict:
        now, real, padded, paused = time.time(), *self._tokens(), self.tokens.paused_s
        t0, step0, real0, padded0, paused0 = self._last
        self._last = (now, step, real, padded, paused)
        dt = now - t0 - (paused - paused0)  # the steps' time: evaluations and saves left out
        if step <= step0 or dt <= 0:
            return {}
        peak = tracking.peak_memory_mb()
        return {
            "training_efficiency/step_time_s": dt / (step - step0),
            "training_efficiency/tokens_per_s_real": (real - real0) / dt,
            "training_efficiency/tokens_per_s_padded": (padded - padded0) / dt,
            "training_efficiency/padding_share": 1 - (real - real0) / max(padded - padded0, 1),
            "training_efficiency/peak_memory_mb": peak,
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or ("train_runtime" in logs and self._no_step(state)):
            return
        record = {"epoch": round(state.epoch or 0.0, 4)}
        for k, v in logs.items():
            if k.startswith("eval_"):
                record[f"eval/{k[5:]}"] = v
            elif k in ("loss", "learning_rate", "grad_norm"):
                record[f"train/{k}"] = v
            elif k == "train_loss":  # the Trainer's mean over the run, not one step's loss
                record["train/mean_loss"] = v
            elif k.startswith("train_") or k == "total_flos":  # the Trainer's closing figures
                record[f"train/{k.removeprefix('train_')}"] = v
            else:
                record[k] = v
        if "loss" in logs:
            efficiency = self._efficiency_since_last(state.global_step)
            self._efficiency_logged |= bool(efficiency)
            record.update(efficiency)
        self.tracker.log(record, state.global_step)
        if self.console is not None and any(k.startswith("eval_") for k in logs):
            shown = ", ".join(
                f"{k[5:]}={v:.4f}"
                for k, v in logs.items()
                if k.startswith("eval_") and isinstance(v, float)
            )
            self.console.print(f"[bold]eval[/] step {state.global_step}: {shown}")


def live_line(logs: dict, tokens_per_s: float | None) -> str:
    """`loss 0.6931 · lr 3.00e-04 · 1,234 tok/s` from a Trainer log record (missing parts left out)."""
    parts = []
    if isinstance(logs.get("loss"), (int, float)):
        parts.append(f"loss {logs['loss']:.4f}")
    if isinstance(logs.get("learning_rate"), (int, float)):
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    return " · ".join(parts)


class LiveProgress(ProgressCallback):
    """The Trainer's progress bar, with the latest loss, lr and tokens/s on the same line
    (the bar shows the ETA) instead of a printed dict per log step."""

    def __init__(self, tokens: TokenCounts):
        super().__init__()
        self.tokens = tokens
        self._t0 = time.time()
        self._tokens0 = 0
        self._paused0 = 0.0

    def _tokens(self) -> int:
        return self.tokens.real

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc="Training", dynamic_ncols=True)
        self.current_step = 0
        self._t0, self._tokens0, self._paused0 = time.time(), self._tokens(), self.tokens.paused_s

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        from tqdm.auto import tqdm

        # The bar is made with its name (the stock one is named only after its first draw,
        # which leaves a nameless "0/N" line behind on a terminal).
        if (
            self.prediction_bar is None
            and state.is_world_process_zero
            and has_length(eval_dataloader)
        ):
            self.prediction_bar = tqdm(total=len(eval_dataloader), desc="Evaluating",
                                       leave=self.training_bar is None, dynamic_ncols=True)  # fmt: skip
        super().on_prediction_step(args, state, control, eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs or "loss" not in logs:
            return  # eval records get their own line; the end-of-training record is the summary
        elapsed = time.time() - self._t0 - (self.tokens.paused_s - self._paused0)
        rate = (self._tokens() - self._tokens0) / elapsed if elapsed > 0 else None
        self.training_bar.set_postfix_str(live_line(logs, rate), refresh=True)
