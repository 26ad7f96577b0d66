"""`sft runs [OUTPUT_DIR]`: one line per run directory — status, steps, best evaluation, age, Slurm job, how each
session ended and the longest checkpoint save — read from
each run's manifest.json, metrics.jsonl and run.lock (nothing is written, no lock is taken).

    sft runs            # the runs under ./runs (output.dir's default)
    sft runs /scratch/$USER/runs
"""
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sft.errors import UserError
from sft.run import lock, manifest as manifests


@dataclass
class RunInfo:
    name: str
    status: str
    steps: int | None
    best: str  # e.g. "eval_accuracy 0.912 @ 40", empty before the first evaluation
    started: datetime | None
    slurm_job: str | None
    ended: str = ""  # how each session ended, oldest first, e.g. "guard,SIGUSR1,finished"
    longest_save_s: float | None = None  # the longest checkpoint save measured in any session
    problems: list[str] = field(default_factory=list)  # what in its files is odd (shown apart from the table)


def list_runs(output_dir: str | Path) -> list[RunInfo]:
    """Every run directory under OUTPUT_DIR, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such directory; pass your config's output.dir (default: runs)")
    runs = [read_run(path) for path in sorted(folder.iterdir()) if (path / manifests.MANIFEST).is_file()]
    return sorted(runs, key=lambda run: (run.started is None, run.started.timestamp() if run.started else 0, run.name))


def read_run(path: Path) -> RunInfo:
    """One run's line; a file of an unexpected shape (hand-edited, another sft version) is flagged, and its run
    still listed, rather than hiding every run behind a traceback."""
    try:
        manifest = manifests.read_manifest(path) or {}
    except (OSError, ValueError):
        return RunInfo(path.name, "unreadable manifest", None, "", None, None)
    try:
        problems: list[str] = []
        steps, best = progress(path / "metrics.jsonl", problems)
        restarts = manifest.get("restarts") or []
        # A resume in a new job (not a requeue) records its own job: show the one that ran last.
        job = restarts[-1].get("slurm_job") if restarts else manifest.get("slurm_job")
        started = _time(manifest.get("started"), problems)
        sessions = manifest.get("sessions") or []
        saves = [seconds for session in sessions for seconds in session.get("checkpoint_saves_s") or []]
        return RunInfo(path.name, status(path, manifest), steps, best, started, job and str(job),
                       ",".join(_short_ending(session.get("ended_by", "?")) for session in sessions),
                       max(saves, default=None), problems)
    except (AttributeError, TypeError, ValueError) as error:  # e.g. the manifest is a list, restarts hold numbers
        return RunInfo(path.name, "unreadable manifest", None, "", None, None,
                       problems=[f"{manifests.MANIFEST} has an unexpected shape ({type(error).__name__}: {error})"])


def _short_ending(ended_by: str) -> str:
    return {"wall-time guard": "guard", "signal on another rank": "signal"}.get(ended_by, ended_by)


def status(path: Path, manifest: dict) -> str:
    recorded = manifest.get("status") or "unknown"
    if recorded in ("starting", "running"):
        # A run records how it ended, except when it is killed outright: then only run.lock tells.
        return "running" if lock.owner_running(path) else "killed"
    return recorded


def progress(metrics_file: Path, problems: list[str]) -> tuple[int | None, str]:
    """Optimizer steps so far and the best evaluation: highest accuracy for classifiers, else lowest eval loss."""
    if not metrics_file.is_file():
        return None, ""
    records = []
    for number, line in enumerate(metrics_file.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:  # the line being written while we read
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            problems.append(f"metrics.jsonl:{number}: {line[:40]} is not a record; left out")
    steps = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)
    for metric, better in (("eval_accuracy", max), ("eval_loss", min)):
        evaluations = [r for r in records if isinstance(r.get(metric), (int, float))]
        if evaluations:
            best = better(evaluations, key=lambda r: r[metric])
            return steps, f"{metric} {best[metric]:.4g} @ {best.get('step')}"
    return steps, ""


def _time(text, problems: list[str]) -> datetime | None:
    """The manifest's start time, always with a time zone (a time without one is taken as this machine's local
    time), so runs sort and age in one clock."""
    if text is None:
        return None
    try:
        started = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        problems.append(f"{manifests.MANIFEST}: started {json.dumps(text)[:40]} is not an ISO time")
        return None
    if started.tzinfo is None:
        problems.append(f"{manifests.MANIFEST}: started {text} has no time zone; taken as local time")
        return started.astimezone()
    return started


def age(started: datetime | None, now: datetime) -> str:
    if started is None:
        return "?"
    seconds = max(0, (now - started).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_runs(runs: list[RunInfo], now: datetime) -> str:
    """Aligned plain columns (grep- and awk-friendly, also in a Slurm log)."""
    header = ("RUN", "STATUS", "STEPS", "BEST", "AGE", "SLURM_JOB", "ENDED", "SAVE")
    rows = [header] + [(run.name, run.status, "-" if run.steps is None else str(run.steps), run.best or "-",
                        age(run.started, now), run.slurm_job or "-", run.ended or "-",
                        "-" if run.longest_save_s is None else f"{run.longest_save_s:.1f}s") for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
