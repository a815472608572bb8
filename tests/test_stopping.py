"""Ctrl-C / SIGTERM during training: the first saves a checkpoint at the step's end and stops."""

from __future__ import annotations

import signal

import pytest
from transformers import TrainerControl, TrainerState

from loralab.stopping import GracefulStop, Stopped


def test_the_first_signal_asks_for_a_checkpoint_at_the_steps_end_then_stops(tmp_path, capsys):
    stop = GracefulStop(tmp_path / "run")
    before = signal.getsignal(signal.SIGTERM)
    state, control = TrainerState(global_step=3), TrainerControl()
    with pytest.raises(Stopped, match=f"stopped at step 4 .*--resume {tmp_path / 'run'}"):
        with stop:
            assert signal.getsignal(signal.SIGTERM) == stop.handle
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
            stop.handle(signal.SIGINT, None)
            stop.handle(signal.SIGINT, None)
    assert type(raised.value) is KeyboardInterrupt and stop.step is None


def test_a_signal_after_the_last_step_still_stops_the_run(tmp_path):
    """Not a final evaluation that the user asked not to wait for."""
    stop = GracefulStop(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with stop:
            stop.handle(signal.SIGTERM, None)
    with stop:  # no signal: nothing happens
        pass


def test_a_signal_during_an_evaluation_stops_at_the_step_it_scored(tmp_path):
    stop = GracefulStop(tmp_path)
    state, control = TrainerState(global_step=8), TrainerControl()
    with pytest.raises(Stopped, match="stopped at step 8"):
        with stop:
            stop.on_step_end(None, state, control)  # step 8 ends; its evaluation begins
            stop.handle(signal.SIGINT, None)
            stop.on_evaluate(None, state, control)  # the evaluation is logged: save step 8
            assert control.should_save
            stop.on_save(None, state, control)
