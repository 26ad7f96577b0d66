"""Wall-time guard: measure what a stop costs (a step, a checkpoint save) and, while one more step and a save still
fit before the allocation ends (sft/allocation.py), checkpoint and stop for a requeue, with no signal needed.

The stop goes through the signal path (sft.training.callbacks.PreemptionCallback): the guard raises the same flag a
SIGUSR1 would, so the ranks agree on the step, and the checkpoint, manifest and exit code 75 are exactly those of a
signal."""
import logging
import time
from collections import deque
from datetime import datetime

from transformers import TrainerCallback

from sft import allocation

log = logging.getLogger("sft")

GUARD = "the wall-time guard"  # what PreemptionCallback.stopped_by says when the guard stopped the run
GUARD_ENDING = "wall-time guard"  # how the manifest says a session ended by the guard
# Stop when what is left falls below (the step in progress + one more + a checkpoint save) x this factor + the
# seconds below: saves vary with filesystem load, and after the save sft still writes the manifest, Python tears
# down, and the script runs `scontrol requeue`, all before Slurm's limit.
MARGIN_FACTOR = 1.25
MARGIN_S = 30.0
# Until the first save is measured: checkpoint bytes (fp32 weights and AdamW's two moments of every trainable
# parameter, 12 bytes each) written at this rate, low for a shared parallel filesystem under load.
ASSUMED_WRITE_BYTES_PER_S = 500e6
RECENT_STEPS = 20  # the step time is the longest of the last steps: one slow batch should not be forgotten at once


class WallTimeCallback(TrainerCallback):
    """Measures steps and checkpoint saves, and asks `preemption` (sft.training.callbacks.PreemptionCallback) to stop
    while one more step and a checkpoint still fit before `end`. Goes before PreemptionCallback in the callback
    list (so a single process stops at this very step) and after CompleteCheckpointCallback (whose marking and
    rotation are part of a save's cost)."""

    def __init__(self, end: float | None, source: str | None, preemption):
        self.end = end
        self.source = source
        self.preemption = preemption
        self.fired = False
        self.session_start = time.time()
        self.step_seconds: deque[float] = deque(maxlen=RECENT_STEPS)
        self.save_seconds: list[float] = []  # every checkpoint save of this session
        self.estimated_save_s = 0.0
        self._mark: float | None = None  # the end of the last step, evaluation or save
        self._warned = False

    @classmethod
    def for_session(cls, config, preemption) -> "WallTimeCallback":
        """Reads when this session's allocation ends (a stop_at duration counts from this call)."""
        end, source = allocation.allocation_end(config.training.stop_at, time.time()) or (None, None)
        return cls(end, source, preemption)

    def ended_by(self) -> str:
        """How a stopped session ended, for the manifest: the guard, or the signal that came first."""
        return GUARD_ENDING if self.fired else (self.preemption.stopped_by or "signal").removeprefix("a ")

    def seconds_left(self) -> float | None:
        return None if self.end is None else round(self.end - time.time(), 1)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.estimated_save_s = 12 * trainable / ASSUMED_WRITE_BYTES_PER_S
        if self.end is not None and args.process_index == 0:
            log.info("wall-time guard: the allocation ends %s (%s, %s from now); a checkpoint is saved and the run "
                     "stops for a requeue when one step and a save no longer fit", _clock(self.end), self.source,
                     _minutes(self.end - time.time()))
            self._check_interval_fits(state, args)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        if self._mark is not None:  # the first step of a session pays for warm-up: not counted
            self.step_seconds.append(now - self._mark)
        self._mark = now
        if self.end is None or self.fired or self.preemption.received:
            return
        # A save due at this step delays the next chance to stop by its length: stop now if that chance comes late.
        left, needed = self.end - now, self.seconds_to_stop() + (self.save_s() if control.should_save else 0.0)
        if left < needed:
            self.fired = True
            self.preemption.received = GUARD
            if args.process_index == 0:
                log.warning("wall-time guard: %.0f s left before the allocation ends, a stop needs %.0f s (step %.1f "
                            "s, checkpoint save %.1f s%s, margin): saving a checkpoint at step %d and stopping for a "
                            "requeue", left, needed, self.step_s(), self.save_s(),
                            "" if self.save_seconds else " estimated", state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self._mark = time.time()

    def on_save(self, args, state, control, **kwargs):
        now = time.time()
        if self._mark is not None:
            self.save_seconds.append(now - self._mark)
            if len(self.save_seconds) == 1 and args.process_index == 0:
                self._check_interval_fits(state, args)
        self._mark = now

    def step_s(self) -> float:
        return max(self.step_seconds, default=0.0)

    def save_s(self) -> float:
        """The longest save measured in this session, else the estimate from the trainable parameters."""
        return max(self.save_seconds, default=self.estimated_save_s)

    def seconds_to_stop(self) -> float:
        """The step in progress and one more (the ranks agree one step late), a save, and the margin."""
        return (2 * self.step_s() + self.save_s()) * MARGIN_FACTOR + MARGIN_S

    def _check_interval_fits(self, state, args) -> None:
        """Said once per session: an allocation shorter than one checkpoint interval plus a stop only ever ends by
        the guard's checkpoint, and each requeue costs a queue wait and a restart."""
        if self._warned or self.end is None:
            return
        allocation, stop = self.end - self.session_start, self.seconds_to_stop()
        interval_steps = _checkpoint_interval(args, state)
        measured_steps = bool(self.step_seconds) and interval_steps > 0
        needed = stop + (interval_steps * self.step_s() if measured_steps else 0.0)
        if allocation >= needed:
            return
        self._warned = True
        what = f"one checkpoint interval ({interval_steps} steps, ~{_minutes(needed - stop)}) plus a stop" \
            if measured_steps else "a checkpoint save and stop"
        fitting_steps = int((allocation - stop) / self.step_s()) if measured_steps and allocation > stop else 0
        advice = f"set training.save_steps to about {fitting_steps}" if fitting_steps else "save less often"
        log.warning("wall-time guard: the %s left of this allocation at sft's start cannot fit %s (by %s, ~%s with "
                    "the margin): %s or ask for more time (sbatch --time); the guard checkpoints before the limit "
                    "either way",
                    _minutes(allocation), what, "measurement" if self.save_seconds else "estimate", _minutes(needed),
                    advice)


def _checkpoint_interval(args, state) -> int:
    """Optimizer steps between scheduled checkpoints; 0 when none are scheduled (save_strategy no or best)."""
    if args.save_strategy == "steps":
        return int(args.save_steps)
    if args.save_strategy == "epoch" and state.num_train_epochs:
        return -(-state.max_steps // state.num_train_epochs)
    return 0


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _minutes(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
