"""Trainer callbacks for what Trainer lacks: a metrics file, complete-checkpoint markers, preemption, a stop on a
non-finite loss, gradient or weight."""
import json
import logging
import math
import shlex
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from sft.errors import UserError
from sft.files import follow_umask
from sft.run import checkpoints

log = logging.getLogger("sft")


class MetricsFileCallback(TrainerCallback):
    """metrics.jsonl: one JSON line per logging step and per evaluation, flushed as it happens."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"

    def on_train_begin(self, args, state, control, **kwargs):
        # A resume loads the checkpoint's logging_steps into the state; training.logging_steps may change on resume.
        state.logging_steps = args.logging_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
        log.info("step %d/%d: %s", state.global_step, state.max_steps, shown)


class CompleteCheckpointCallback(TrainerCallback):
    """Marks checkpoint-N complete once every rank has written its part and its weights are finite; only marked ones
    are resumed from. Then, and only then, removes checkpoints beyond save_total_limit: Trainer's own rotation runs
    before this marker exists, so a kill in between would leave no complete checkpoint at all. A checkpoint with nan
    or inf weights is removed instead and the run stops: complete means good to resume from."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, model=None, **kwargs):
        from accelerate import PartialState
        from transformers.trainer_utils import rotate_checkpoints

        PartialState().wait_for_everyone()
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        non_finite = non_finite_parameters(model)
        if non_finite is not None:
            if state.is_world_process_zero:
                shutil.rmtree(checkpoint, ignore_errors=True)
            where = ", ".join(non_finite[:3]) or "in the shards of another process"
            raise UserError(f"training: the weights hold nan or inf after step {state.global_step} ({where}); "
                            f"{_stopped(args)}")
        if state.is_world_process_zero:
            follow_umask(checkpoint)
            checkpoints.mark_complete(checkpoint)
            rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint)


def non_finite_parameters(model) -> list[str] | None:
    """None when every trained parameter is finite, else the names of the non-finite ones this process holds (under
    FSDP each process checks its own shards, and the processes agree on the answer). One sum per tensor and one
    sync (its cost: docs/safety.md)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    trained = [(name, p.to_local() if isinstance(p, DTensor) else p) for name, p in model.named_parameters()
               if p.requires_grad]  # frozen weights (LoRA's base model) never change
    if not trained:
        return None
    # A tensor's sum is nan or inf when one of its values is (or when they add up past 3e38, as no trained weights
    # do): one read of the weights, where isfinite() writes a mask too and took 40x longer on a CPU.
    finite = torch.stack([p.sum(dtype=torch.float32) for _, p in trained]).isfinite()
    all_finite = finite.all().to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(all_finite, op=dist.ReduceOp.MIN)
    if all_finite.item():
        return None
    return [name for (name, _), ok in zip(trained, finite.tolist()) if not ok]


class PreemptionCallback(TrainerCallback):
    """SIGUSR1/SIGTERM (Slurm's warning before preemption or the time limit): finish the current optimizer step,
    save a checkpoint, stop. Under torchrun the ranks agree on the flag, so every process stops at the same step.

    Agreeing costs no waiting: each step end starts a non-blocking all-reduce of the flag on a CPU (gloo) group
    and reads the one started at the previous step end, long finished by then. Every rank reads the same
    result at the same step, one step after the signal. (A blocking all-reduce of a GPU tensor would stall every
    step until the GPU had drained its queue of kernels.)"""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self.stopped_by: str | None = None
        self.stopped_at_epoch_end = False
        self._previous: dict = {}
        self._group = None
        self._pending = None  # (all-reduce in flight, its flag tensor)

    def install(self) -> None:
        """Catch the signals from the start of the run: a USR1 during model loading must not kill the job."""
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1 and self._group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # a collective: every rank runs on_train_begin

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_by or not self._all_ranks_agree_to_stop(args):
            return
        self.stopped_by = self.received or "a signal on another rank"
        control.should_training_stop = True
        # The last step of an epoch (Trainer's epoch counter is whole only there) or of the run: the epoch end
        # still evaluates as it would have, since a resume from this step starts at the next epoch. The run's last
        # step then finishes the run as usual; any other one saves at the epoch end, after the evaluation, so the
        # checkpoint holds it (early stopping's count, the best checkpoint), and not here too.
        self.stopped_at_epoch_end = float(state.epoch or 0).is_integer() or state.global_step >= state.max_steps
        if not self.stopped_at_epoch_end:
            control.should_save = True
        elif state.global_step < state.max_steps:
            control.should_save = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.stopped_by:
            return
        if self.stopped_at_epoch_end:
            if state.global_step < state.max_steps:
                control.should_save = True
        else:
            # Stopping mid-epoch still ends the epoch loop: do not evaluate a partial epoch or save a second time.
            control.should_evaluate = False
            control.should_save = False

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:  # every rank started it: complete it before the process group goes away
            self._pending[0].wait()
            self._pending = None

    def _all_ranks_agree_to_stop(self, args) -> bool:
        if args.world_size <= 1:
            return self.received is not None
        import torch
        import torch.distributed as dist

        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([1 if self.received else 0])
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return stop


class NonFiniteLossCallback(TrainerCallback):
    """Stop when the logged training loss or gradient norm is nan or inf, before another checkpoint is written: the
    newest complete checkpoint stays the last one whose steps all had a finite loss. (An infinite gradient still
    logs a finite loss for its step, and its update writes nan into the weights.)

    The loss is the mean since the previous log, so a log is forced before every save: no checkpoint is written
    without its steps' loss checked. The gradient norm is the logging step's own; an earlier step's non-finite
    update shows in the loss after it, and CompleteCheckpointCallback checks the weights themselves. Needs
    TrainingArguments(logging_nan_inf_filter=False): with the filter Trainer replaces a non-finite step's loss by
    the running mean, and the log never shows it. Under torchrun every rank logs the same all-reduced loss and
    gradient norm, so every rank stops at the same step."""

    def __init__(self):
        self.last_logged_step: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.last_logged_step is None:  # the step a resumed run starts from, known once its state is loaded
            self.last_logged_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self._log_before_saving(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._log_before_saving(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        first_step, self.last_logged_step = self.last_logged_step + 1, state.global_step
        grad_norm = logs.get("grad_norm")
        if not math.isfinite(logs["loss"]):
            steps = f"step {state.global_step}" if first_step == state.global_step else \
                f"step {state.global_step} (the mean over steps {first_step}-{state.global_step})"
            raise UserError(f"training: the training loss is {logs['loss']} at {steps}; {_stopped(args)}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise UserError(f"training: the gradient norm is {grad_norm} at step {state.global_step}; "
                            f"{_stopped(args)}")

    @staticmethod
    def _log_before_saving(control) -> None:
        if control.should_save:
            control.should_log = True


def _stopped(args) -> str:
    """The rest of a non-finite stop's line: what is left to restart from, and how."""
    complete = checkpoints.complete_checkpoints(Path(args.output_dir))
    if not complete:
        return ("stopped (no checkpoint was written yet). Lower training.learning_rate, raise "
                "training.warmup_ratio, or check the data around this step, then start a new run (another "
                "output.name)")
    good = complete[-1].name
    name = shlex.quote("output.name=" + Path(args.output_dir).parent.name.replace("{", "{{").replace("}", "}}"))
    return (f"stopped ({good} is the last good checkpoint). Restart from it with a lower learning rate: sft train "
            f"CONFIG {name} --from-checkpoint {good} training.learning_rate=LOWER (docs/troubleshooting.md), or "
            f"check the data around this step")


class ConfiguredLearningRateCallback(TrainerCallback):
    """A run restarted from a chosen checkpoint may lower training.learning_rate (--from-checkpoint), but the
    checkpoint's optimizer and scheduler states carry the old rate, which Trainer would silently go on with. Once
    they are loaded, scale both to the configured rate: the schedule (warmup, decay) continues from the same point.
    On any other run the rates already agree and nothing changes."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        base_rates = getattr(lr_scheduler, "base_lrs", None)  # none in reduce_lr_on_plateau and greedy
        if not base_rates or base_rates[0] == args.learning_rate:
            return
        scale = args.learning_rate / base_rates[0]
        lr_scheduler.base_lrs = [rate * scale for rate in lr_scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= scale
            group["initial_lr"] *= scale
        # What get_last_lr() returns, and Trainer logs, until the scheduler's next step sets it anew.
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        log.info("learning rate: %g from here on (the checkpoint had %g)", args.learning_rate,
                 args.learning_rate / scale)


class EvalMetricsCallback(TrainerCallback):
    """eval_metrics.json after each evaluation (rank 0 writes; every rank computed the same metrics)."""

    def __init__(self, run_dir: Path, compute_metrics):
        self.run_dir = run_dir
        self.compute_metrics = compute_metrics

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        from sft.run.records import write_eval_metrics
        from sft.training.metrics import eval_record

        if state.is_world_process_zero and metrics:
            write_eval_metrics(self.run_dir, eval_record(state.global_step, state.epoch or 0, metrics,
                                                         self.compute_metrics))


def tensorboard_callback(run_dir: Path, resume_step: int | None):
    """Trainer's TensorBoard logging into RUN_DIR/tensorboard (`tensorboard --logdir runs/` shows every run).
    A resumed run logs the steps after its checkpoint again: purge_step hides the earlier session's copies."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    folder = str(run_dir / "tensorboard")
    callback = TensorBoardCallback(SummaryWriter(log_dir=folder, purge_step=resume_step + 1 if resume_step else None))
    callback.logging_dir = folder  # where it reopens a writer for an evaluation after training, not checkpoints/
    return callback


class OverfittingWarningCallback(TrainerCallback):
    """A log warning when eval loss has risen for `evaluations` evaluations in a row while training loss fell. Reads
    the run's earlier metrics on start, so a resumed run keeps counting."""

    def __init__(self, run_dir: Path, evaluations: int):
        self.path = run_dir / "metrics.jsonl"
        self.evaluations = evaluations
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path.is_file():  # already cut back to the checkpoint a resumed run starts from
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def on_log(self, args, state, control, logs=None, **kwargs):
        from sft.training.metrics import overfitting_streak

        if not state.is_world_process_zero or not logs:
            return
        self.records.append(logs)
        if "eval_loss" not in logs:
            return
        streak = overfitting_streak(self.records)
        if streak >= self.evaluations:
            log.warning("eval loss has risen for %d evaluations in a row while training loss fell: the model may be "
                        "overfitting (consider fewer epochs, training.early_stopping or "
                        "training.load_best_model_at_end)", streak)
