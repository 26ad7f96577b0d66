"""The wall-time guard's decisions, from given step and save times (the runs that measure real ones, and stop and
resume exactly, are in tests/training/test_trainer.py and tests/test_slurm.py): it raises the signal path's flag while a
step and a save still fit, counts a save due at this step, lets a signal that came first win, and warns once when
the allocation cannot fit a checkpoint interval."""
import logging
import time
from types import SimpleNamespace

import pytest

from sft.training.callbacks import PreemptionCallback
from sft.training.walltime import GUARD, MARGIN_S, WallTimeCallback

ARGS = SimpleNamespace(process_index=0, save_strategy="steps", save_steps=100)
STATE = SimpleNamespace(global_step=5, max_steps=1000, num_train_epochs=1)


def guard(seconds_left: float, step_s: float = 1.0, save_s: float = 20.0) -> WallTimeCallback:
    """A guard whose allocation ends seconds_left from now, having measured these step and save times."""
    callback = WallTimeCallback(time.time() + seconds_left, "test", PreemptionCallback())
    callback.step_seconds.append(step_s)
    callback.save_seconds.append(save_s)
    callback._mark = time.time()
    return callback


def step_end(callback: WallTimeCallback, save_due: bool = False) -> None:
    callback.on_step_end(ARGS, STATE, SimpleNamespace(should_save=save_due))


def test_it_stops_while_a_step_and_a_save_still_fit():
    needed = (2 * 1.0 + 20.0) * 1.25 + MARGIN_S  # 57.5 s
    plenty = guard(needed + 30)
    step_end(plenty)
    assert plenty.preemption.received is None and not plenty.fired
    short = guard(needed - 10)
    step_end(short)
    assert short.preemption.received == GUARD and short.fired and short.ended_by() == "wall-time guard"


def test_a_save_due_at_this_step_makes_it_stop_one_save_earlier():
    callback = guard((2 * 1.0 + 20.0) * 1.25 + MARGIN_S + 10)  # enough, unless a 20 s save comes first
    step_end(callback, save_due=True)
    assert callback.preemption.received == GUARD


def test_a_signal_that_came_first_wins():
    callback = guard(1)
    callback.preemption.received = callback.preemption.stopped_by = "SIGUSR1"
    step_end(callback)
    assert callback.preemption.received == "SIGUSR1" and callback.ended_by() == "SIGUSR1"


def test_without_a_known_end_it_never_stops():
    callback = WallTimeCallback(None, None, PreemptionCallback())
    callback.step_seconds.append(1000.0)
    step_end(callback)
    assert callback.preemption.received is None and callback.seconds_left() is None


def test_an_allocation_shorter_than_a_checkpoint_interval_is_said_once(caplog):
    # 100 steps of 1 s between checkpoints, in 2 minutes: about 120 - 57.5 = 62 steps fit.
    callback = guard(120)
    with caplog.at_level(logging.WARNING, logger="sft"):
        for _ in range(2):  # at the start, and after the first save
            callback.on_train_begin(ARGS, STATE, SimpleNamespace())
    warnings = [r.getMessage() for r in caplog.records if "cannot fit" in r.getMessage()]
    assert len(warnings) == 1
    assert "one checkpoint interval (100 steps" in warnings[0] and "set training.save_steps to about 62" in warnings[0]

    fits = guard(100 * 1.0 + 57.5 + 30)
    with caplog.at_level(logging.WARNING, logger="sft"):
        caplog.clear()
        fits.on_train_begin(ARGS, STATE, SimpleNamespace())
    assert not [r for r in caplog.records if "cannot fit" in r.getMessage()]


@pytest.mark.parametrize("strategy, interval", [("steps", 100), ("epoch", 250), ("no", 0)])
def test_the_checkpoint_interval_follows_the_save_strategy(strategy, interval):
    from sft.training.walltime import _checkpoint_interval

    state = SimpleNamespace(max_steps=1000, num_train_epochs=4)
    assert _checkpoint_interval(SimpleNamespace(save_strategy=strategy, save_steps=100), state) == interval
