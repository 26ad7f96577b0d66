"""When this session's allocation ends: SFT_JOB_END (the sbatch scripts read the job's end time with squeue on the
host and pass it into the container, which has no squeue; on other schedulers set it yourself), training.stop_at,
or squeue itself where sft runs in a Slurm allocation without the scripts (an interactive srun). The earliest wins.
Read by the wall-time guard (sft/training/walltime.py); no heavy imports, as sft.config checks training.stop_at
with it."""
import logging
import os
import re
import shutil
import subprocess
from datetime import datetime

log = logging.getLogger("sft")

JOB_END_VARIABLE = "SFT_JOB_END"
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_end(text: str, now: float, epoch_allowed: bool = False) -> float:
    """An end time as seconds since the epoch, from a duration counted from now (3h30m, 90m, 45s, 1d2h), an ISO
    time (2026-12-07T18:00, local time unless it names its zone) or, where epoch_allowed, seconds since the epoch
    (what the sbatch scripts pass). ValueError otherwise."""
    text = text.strip()
    if epoch_allowed and re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    duration = _DURATION.fullmatch(text)
    if text and duration:
        days, hours, minutes, seconds = (int(part or 0) for part in duration.groups())
        return now + ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"'{text}' is neither a duration (3h30m, 90m, 45s) nor a time (2026-12-07T18:00)") from None


def allocation_end(stop_at: str | None, now: float) -> tuple[float, str] | None:
    """(end time, where it came from) for this session, or None when nothing says when it ends."""
    ends = []
    if os.environ.get(JOB_END_VARIABLE):
        try:
            ends.append((parse_end(os.environ[JOB_END_VARIABLE], now, epoch_allowed=True), JOB_END_VARIABLE))
        except ValueError as error:
            log.warning("%s: %s; the wall-time guard ignores it", JOB_END_VARIABLE, error)
    elif os.environ.get("SLURM_JOB_ID") and shutil.which("squeue"):
        slurm_end = _squeue_end(os.environ["SLURM_JOB_ID"])
        if slurm_end:
            ends.append((slurm_end, "squeue"))
    if stop_at:
        ends.append((parse_end(stop_at, now), "training.stop_at"))
    return min(ends) if ends else None


def _squeue_end(job_id: str) -> float | None:
    """The job's end time from squeue (local time, e.g. 2026-12-07T18:00:00); None for no limit or no answer."""
    try:
        answer = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        return datetime.fromisoformat(answer).timestamp()
    except (OSError, subprocess.SubprocessError, ValueError):  # not reachable, or NONE/Unknown: no time limit
        return None
