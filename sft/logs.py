"""Logging: one timestamped log file per run (appended on restart), echoed to the terminal, secrets masked."""
import logging
import re
import sys
from datetime import datetime
from pathlib import Path

from sft.secrets import MaskingFilter

LOGGERS = ("sft", "transformers", "peft", "accelerate")  # transformers/peft warnings belong in the run's record too
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_terminal = None  # set by setup_terminal

# peft imports bitsandbytes whenever it is installed (every LoRA run in the GPU image). On CPUs with AVX512-BF16, as
# on many GPU nodes, bitsandbytes then tries to fetch a CPU 4-bit kernel from the hub and, offline, warns "pip install
# kernels" as the run's first line. sft runs 4-bit layers on GPUs only (qlora), so that advice misleads; errors stay.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class PlainFormatter(logging.Formatter):
    """Log files get no terminal colour codes (transformers puts some in its load reports)."""

    def format(self, record: logging.LogRecord) -> str:
        return ANSI_ESCAPE.sub("", super().format(record))


def setup_terminal(debug: bool = False) -> None:
    from rich.logging import RichHandler

    global _terminal
    _terminal = _stderr_console()
    handler = RichHandler(show_path=False, rich_tracebacks=debug, console=_terminal)
    handler.addFilter(MaskingFilter())
    logger = logging.getLogger("sft")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def add_run_log(run_dir: Path, resumed: bool) -> Path:
    """Attach the run's log file: a restart appends to the first one so a run has one continuous log."""
    existing = sorted(run_dir.glob("sft_log_*.log"))
    path = existing[0] if resumed and existing else run_dir / f"sft_log_{datetime.now():%Y%m%d_%H%M%S}.log"
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(PlainFormatter(FORMAT))
    handler.addFilter(MaskingFilter())
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    if not sys.stderr.isatty():
        # Slurm output files fill up with carriage-return progress bars otherwise (model loading, shard writing).
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    return path


def terminal_console():
    """The console the log lines go to: a progress bar must share it, or the two overwrite each other."""
    return _terminal or _stderr_console()


def _stderr_console():
    from rich.console import Console

    # Slurm output files are not terminals: no colours or cursor tricks there, and wide lines.
    return Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def close_run_log() -> None:
    """Detach run log files, so a second run in the same process (a notebook) does not write into this one's."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
            handler.close()
