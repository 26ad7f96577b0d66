"""What a terminal shows while training: the settings table as training starts, then a rich progress bar with
step, epoch, loss, real tokens/s and ETA. The bar only on a TTY: Slurm output files get the plain timestamped log
line of each logging step instead."""
import sys

from rich.table import Table
from transformers import TrainerCallback

from sft.config import Config
from sft.run.plots import THROUGHPUT_KEY


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


def print_run_start(config: Config, prepared, run_dir, precision: str, processes: int) -> None:
    """The settings a user checks first in a job's output, printed once as training starts."""
    from sft.logs import terminal_console

    table = Table(title="sft train", show_header=False)
    for name, value in run_start_rows(config, prepared, run_dir, precision, processes):
        table.add_row(name, value)
    terminal_console().print(table)


def run_start_rows(config: Config, prepared, run_dir, precision: str, processes: int) -> list[tuple[str, str]]:
    t, method = config.training, config.method
    budget = (f"{t.max_tokens_per_batch} tokens" if t.max_tokens_per_batch else f"{t.batch_size} examples")
    eval_rows = f"{len(prepared.eval)} eval" if prepared.eval is not None else "no eval"
    data_unit = "token-budget batches" if t.max_tokens_per_batch else "examples"
    return [("model", config.model.name),
            ("task / method", f"{config.task} / " + (f"{'QLoRA' if method.name == 'qlora' else 'LoRA'} r={method.lora.r} alpha={method.lora.alpha}"
                                                     if method.name != "full" else "full fine-tuning")),
            ("data", f"{prepared.data_format}: {len(prepared.train)} training {data_unit}, {eval_rows}"),
            ("batch", f"{budget} per process x {_count(processes, 'process', 'processes')} x "
                      f"{_count(t.gradient_accumulation_steps, 'accumulation step', 'accumulation steps')}"),
            ("length", f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"),
            ("precision", precision), ("attention", config.model.attn_implementation),
            ("run directory", str(run_dir))]


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"
