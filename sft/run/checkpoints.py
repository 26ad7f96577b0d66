"""checkpoints/ and final/: which checkpoints are complete, going back to one, writing final/ so it always
holds a whole model, and what a full disk leaves behind."""
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from sft.errors import UserError
from sft.files import follow_umask, is_disk_full, write_text_atomic
from sft.run.directory import RunDir

COMPLETE_MARKER = ".complete"
FINAL = "final"
# The final model is written here, marked complete, then renamed to final/: final/ always holds a whole model.
FINAL_IN_PROGRESS = ".final.partial"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# Checkpoints: Trainer writes checkpoint-N/ in place, so completeness is a marker written after every file.

def mark_complete(checkpoint: Path) -> None:
    write_text_atomic(checkpoint / COMPLETE_MARKER, datetime.now().isoformat() + "\n")


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m[1]), p) for p in checkpoints.iterdir() if (m := CHECKPOINT.match(p.name))
             and (p / COMPLETE_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def discard_incomplete_checkpoints(checkpoints: Path) -> list[Path]:
    """Remove checkpoints a kill interrupted mid-write: never resumed from, and Trainer would reuse their names."""
    if not checkpoints.is_dir():
        return []
    incomplete = [p for p in checkpoints.iterdir() if CHECKPOINT.match(p.name) and not (p / COMPLETE_MARKER).is_file()]
    for path in incomplete:
        shutil.rmtree(path)
    return incomplete


def checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT.match(checkpoint.name)[1])


def restart_from(run: RunDir, name: str) -> Path | None:
    """Make checkpoint NAME of an unfinished run the one it resumes from (`sft train --from-checkpoint NAME`): the
    checkpoints after it are moved, not deleted, into RUN/checkpoints.abandoned-TIME/, which is returned (None when
    there were none)."""
    complete = complete_checkpoints(run.checkpoints)
    if not run.resumed or run.checkpoints / name not in complete:
        have = ", ".join(p.name for p in complete) if run.resumed and complete else "none"
        raise UserError(f"--from-checkpoint {name}: {run.path} has no complete checkpoint of that name (complete "
                        f"ones: {have}); name one of them, or check output.name")
    step = checkpoint_step(run.checkpoints / name)
    later = [p for p in run.checkpoints.iterdir() if CHECKPOINT.match(p.name) and checkpoint_step(p) > step]
    if not later:
        return None
    aside = run.path / f"checkpoints.abandoned-{datetime.now():%Y%m%d-%H%M%S}"
    aside.mkdir()
    for checkpoint in later:
        os.rename(checkpoint, aside / checkpoint.name)
    return aside


def start_final(run_dir: Path) -> Path:
    """An empty folder to write the final model into, in place of one a kill or a full disk left half-written."""
    partial = run_dir / FINAL_IN_PROGRESS
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    return partial


def publish_final(partial: Path) -> Path:
    """Mark the written final model complete and move it to final/. A final/ already there comes from an attempt
    killed before its manifest said finished (a finished run is never reopened without --overwrite): replace it."""
    follow_umask(partial)
    mark_complete(partial)
    final = partial.parent / FINAL
    if final.exists():
        shutil.rmtree(final)
    os.rename(partial, final)
    return final


def disk_full_error(error: BaseException, run: RunDir, resume: str) -> UserError | None:
    """For a run that failed on a full disk or quota: remove what it left half-written (space back to the user; a
    resume would discard it anyway) and say what survived. None for any other failure."""
    if isinstance(error, (UserError, KeyboardInterrupt)) or not is_disk_full(error, run.path):
        return None
    unfinished = [path.name for path in discard_incomplete_checkpoints(run.checkpoints)]
    if (run.path / FINAL_IN_PROGRESS).exists():
        shutil.rmtree(run.path / FINAL_IN_PROGRESS)
        unfinished.append("the final model")
    complete = complete_checkpoints(run.checkpoints)
    kept = f"{complete[-1].name} is intact" if complete else "no checkpoint was complete yet"
    during = f" while writing {' and '.join(unfinished)}" if unfinished else ""
    return UserError(f"output.dir: disk full or quota exceeded{during} in {run.path} ({kept}); free space there "
                     f"(`df -h`, your cluster's quota command) and resume with: {resume}")
