"""Stopping a run without losing its work: the first Ctrl-C or SIGTERM during training finishes
the step under way, saves a checkpoint there and stops, so that `--resume` (or a study's next
worker) continues from that step rather than from the last periodic checkpoint, up to
`train.save_steps` steps back. A periodic evaluation under way (minutes on SQuAD on a CPU,
longer than a study's worker waits) is cut short at its next batch instead: the checkpoint of
the step it was scoring owes it (`eval_owed`), and the resume runs it first, so the run's
records come out as an uninterrupted run's. A second Ctrl-C stops at once;
a second SIGTERM changes nothing (whoever sent it follows up with SIGKILL when tired of
waiting: a study's worker gives its training child 30 s). Before the first step and after the
last (evaluations) a signal stops at once, as everywhere else; a SIGTERM after it cannot cut the
failed summary short.

The run then stops as one killed right after that checkpoint would: no closing records, the
summary `failed` with the reason, the resume bit-identical to an uninterrupted run.

One process only: under data parallelism the processes would have to agree on the step to
stop at (a collective every step); there a signal stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from transformers import TrainerCallback

from . import distributed

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"stopped at step {step} with a checkpoint there; `loralab train "
                         f"--resume {run_dir}` continues")  # fmt: skip
        self.step = step


class EvaluationCut(Exception):
    """A stop came during a periodic evaluation: the trainer saves the step it was scoring."""


_active: GracefulStop | None = None  # the run's while its `with` is open (signals are per process)


def poll() -> None:
    """Raise `EvaluationCut` where a stop came during a periodic evaluation; called by every
    batch of the evaluation loops of heads' own (verbalizers, generation), as the Trainer's
    prediction loop calls `on_prediction_step`."""
    if _active is not None and _active.last_step is not None:
        _active.cut(_active.last_step)


class GracefulStop(TrainerCallback):
    """Around a run (`with stop:` over its start-up, training, evaluation and summary): the
    first SIGINT/SIGTERM during the training steps saves a checkpoint at the end of the current
    step, then raises `Stopped`; outside them it raises KeyboardInterrupt at once. Once a stop
    is under way a further SIGTERM is ignored, so that it cannot cut the failed summary short
    (a study's worker sends one when it is stopped itself)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.requested = False
        self.training = False  # between the Trainer's first step and its end
        self.step: int | None = None  # the step whose checkpoint ends the run
        self.last_step: int | None = None  # the last step ended (what an evaluation scores)
        self._old: dict = {}

    def __enter__(self) -> GracefulStop:
        global _active
        self.requested, self.training, self.step, self.last_step = False, False, None, None
        if threading.current_thread() is threading.main_thread() and distributed.world_size() == 1:
            self._old = {s: signal.signal(s, self.handle) for s in _SIGNALS}
            _active = self
        return self

    def __exit__(self, kind, value, tb) -> None:
        global _active
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        if _active is self:
            _active = None

    def handle(self, signum, frame) -> None:
        if self.requested:  # stopping already: a second Ctrl-C means now, a SIGTERM waits
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        if not self.training:  # start-up or an evaluation outside the steps: stop at once
            raise KeyboardInterrupt
        below_bar = "\n" if sys.stderr.isatty() else ""  # the progress bar has no newline
        print(f"{below_bar}loralab: stopping at the end of this step, with a checkpoint there (an "
              "evaluation under way runs again on resume; Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)  # fmt: skip

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step = state.global_step
        if self.requested and self.step is None:
            self.step = state.global_step
            control.should_save = True

    def cut(self, step: int) -> None:
        """Raise `EvaluationCut` where a signal came during a periodic evaluation of `step`, or
        during the step it follows: the run stops there at once (its trainer saves the step
        owing the evaluation) rather than after the whole evaluation."""
        if self.requested and self.training and self.step in (None, step):
            self.step = step
            raise EvaluationCut

    def on_prediction_step(self, args, state, control, **kwargs):
        self.cut(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        # An evaluation that ended before the stop could cut it: stop at the step it scored,
        # saved right after it is logged, rather than after one more step.
        self.on_step_end(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if self.step is not None and state.global_step == self.step:
            self.training = False
            raise Stopped(self.step, self.run_dir)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        if self.requested:  # it came after the last step's end: stop all the same
            raise KeyboardInterrupt
