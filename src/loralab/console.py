"""Console hygiene: known third-party noise silenced where it starts, and the live training line.

Only the warnings and progress bars listed here are silenced, and only around the calls that
emit them; every other warning still reaches the user.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from transformers.trainer_callback import ProgressCallback

# (category, message regex) of deprecation notices that users cannot act on.
KNOWN_WARNINGS = (
    # datasets.Dataset.sort passes null_placement the way pyarrow 25 deprecated.
    (FutureWarning, r"Specifying null_placement in SortOptions is deprecated"),
    # PEFT reads model.is_gradient_checkpointing, which transformers 5 renamed.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


@contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Ignore only the KNOWN_WARNINGS inside the block."""
    with warnings.catch_warnings():
        for category, message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextmanager
def library_bars_off() -> Iterator[None]:
    """No transformers ("Loading weights", "Writing model shards") or datasets ("Saving the
    dataset") progress bars inside the block; their previous state is restored afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_on = hf_logging.is_progress_bar_enabled()
    ds_on = datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hf_on:
            hf_logging.enable_progress_bar()
        if ds_on:
            datasets.enable_progress_bars()


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

    def __init__(self):
        super().__init__()
        self.trainer = None  # set by train.py: the token counter lives on the trainer
        self._t0 = time.time()
        self._tokens0 = 0

    def _tokens(self) -> int:
        return getattr(self.trainer, "tokens_real", 0) if self.trainer is not None else 0

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc="Training", dynamic_ncols=True)
        self.current_step = 0
        self._t0, self._tokens0 = time.time(), self._tokens()

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        super().on_prediction_step(args, state, control, eval_dataloader, **kwargs)
        if self.prediction_bar is not None and not self.prediction_bar.desc:
            self.prediction_bar.set_description("Evaluating")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs or "loss" not in logs:
            return  # eval records get their own line; the end-of-training record is the summary
        elapsed = time.time() - self._t0
        rate = (self._tokens() - self._tokens0) / elapsed if elapsed > 0 else None
        self.training_bar.set_postfix_str(live_line(logs, rate), refresh=True)
