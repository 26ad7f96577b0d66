"""Training progress on a terminal: a rich progress bar with step, epoch, loss, real tokens/s and ETA. Only on a
TTY: Slurm output files get the plain timestamped log line of each logging step instead."""
import sys

from transformers import TrainerCallback

from sft.plots import THROUGHPUT_KEY


def terminal_progress():
    """The progress bar callback for this process's terminal, or None when stderr is not one (a Slurm log)."""
    if not sys.stderr.isatty():
        return None
    from sft.logs import terminal_console

    return TerminalProgress(terminal_console())


class TerminalProgress(TrainerCallback):
    def __init__(self, console, auto_refresh: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # Log lines (one per logging step) print above the bar because both go through the same console.
        self.progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("epoch {task.fields[epoch]:.2f}  loss {task.fields[loss]}  "
                                            "{task.fields[tokens_per_s]} tokens/s  ETA"),
                                 TimeRemainingColumn(), console=console, auto_refresh=auto_refresh, transient=False)
        self.task = None
        self.refresh_each_step = not auto_refresh  # tests draw by hand; a terminal redraws 4 times a second

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        # A resumed run starts at its checkpoint's step; the ETA counts only steps done in this session.
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           epoch=state.epoch or 0.0, loss="-", tokens_per_s="-")
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.progress.update(self.task, completed=state.global_step, epoch=state.epoch or 0.0)
            if self.refresh_each_step:
                self.progress.refresh()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.task is None or not logs:
            return
        fields = {}
        if "loss" in logs:
            fields["loss"] = f"{logs['loss']:.4g}"
        if THROUGHPUT_KEY in logs:
            fields["tokens_per_s"] = f"{logs[THROUGHPUT_KEY]:,.0f}"
        self.progress.update(self.task, **fields)

    def on_train_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.progress.stop()
            self.task = None
