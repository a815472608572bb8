"""Ctrl-C / SIGTERM: during the training steps the first saves a checkpoint at the step's end
and stops; outside them it stops at once; once stopping, SIGTERM cannot cut the summary short."""

from __future__ import annotations

import signal

import pytest
from transformers import TrainerControl, TrainerState

from loralab.stopping import GracefulStop, Stopped


def _training(stop: GracefulStop, step: int = 0):
    state, control = TrainerState(global_step=step), TrainerControl()
    stop.on_train_begin(None, state, control)
    return state, control


def test_the_first_signal_asks_for_a_checkpoint_at_the_steps_end_then_stops(tmp_path, capsys):
    stop = GracefulStop(tmp_path / "run")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match=f"stopped at step 4 .*--resume {tmp_path / 'run'}"):
        with stop:
            assert signal.getsignal(signal.SIGTERM) == stop.handle
            state, control = _training(stop, 3)
            stop.on_step_end(None, state, control)
            assert not control.should_save  # no signal yet: the step's own plan
            stop.handle(signal.SIGTERM, None)
            assert "stopping at the end of this step" in capsys.readouterr().err
            stop.handle(signal.SIGTERM, None)  # again: its sender waits, then SIGKILLs
            state.global_step = 4
            stop.on_step_end(None, state, control)
            assert control.should_save
            stop.on_save(None, state, control)  # the checkpoint is written: now stop
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are put back


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    stop = GracefulStop(tmp_path)
    with pytest.raises(KeyboardInterrupt) as raised:
        with stop:
            _training(stop)
            stop.handle(signal.SIGINT, None)
            stop.handle(signal.SIGINT, None)
    assert type(raised.value) is KeyboardInterrupt and stop.step is None


def test_outside_the_steps_a_signal_stops_at_once_and_a_later_sigterm_waits(tmp_path):
    """Start-up and the final evaluation stop at once, as before. A study's worker then sends
    its own SIGTERM while the run writes its failed summary: that one must not cut it short."""
    stop = GracefulStop(tmp_path)
    with stop:
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGTERM, None)  # e.g. during the zero-shot evaluation
        stop.handle(signal.SIGTERM, None)  # the summary is being written: ignored
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)  # but a Ctrl-C still means now


def test_a_signal_after_the_last_steps_end_stops_when_training_ends(tmp_path):
    """Not a final evaluation that the user asked not to wait for."""
    stop = GracefulStop(tmp_path)
    with stop:
        state, control = _training(stop, 16)
        stop.handle(signal.SIGTERM, None)
        with pytest.raises(KeyboardInterrupt):
            stop.on_train_end(None, state, control)
    with stop:  # no signal: nothing happens
        stop.on_train_end(None, *_training(stop))


def test_a_signal_during_an_evaluation_stops_at_the_step_it_scored(tmp_path):
    stop = GracefulStop(tmp_path)
    with pytest.raises(Stopped, match="stopped at step 8"):
        with stop:
            state, control = _training(stop, 8)
            stop.on_step_end(None, state, control)  # step 8 ends; its evaluation begins
            stop.handle(signal.SIGINT, None)
            stop.on_evaluate(None, state, control)  # the evaluation is logged: save step 8
            assert control.should_save
            stop.on_save(None, state, control)
