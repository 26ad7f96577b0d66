"""Terminal progress: a rich bar with step, epoch, loss, tokens/s and ETA on a TTY, nothing extra in Slurm logs."""
import io
import re
import sys
from types import SimpleNamespace

from sft.training.progress import TerminalProgress, terminal_progress


def test_progress_bar_shows_step_epoch_loss_tokens_per_second_and_eta():
    from rich.console import Console

    output = io.StringIO()
    progress = TerminalProgress(Console(file=output, force_terminal=True, width=150, color_system=None),
                                auto_refresh=False)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=40, global_step=10, epoch=0.5)  # resumed at 10
    progress.on_train_begin(None, state, None)
    state.global_step, state.epoch = 12, 0.6
    progress.on_log(None, state, None, logs={"loss": 1.23456, "learning_rate": 1e-4, "real_tokens_per_s": 12345.6})
    progress.on_step_end(None, state, None)
    progress.on_train_end(None, state, None)
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.getvalue())  # cursor moves between redraws
    shown = [line for line in re.split(r"[\r\n]", drawn) if "step" in line][-1]  # the last redraw
    assert "step 12/40" in shown and "epoch 0.60" in shown and "loss 1.235" in shown
    assert "12,346 tokens/s" in shown and "ETA" in shown


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a Slurm output file: plain log lines only
    assert terminal_progress() is None
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(isatty=lambda: True, write=lambda text: None))
    assert isinstance(terminal_progress(), TerminalProgress)
