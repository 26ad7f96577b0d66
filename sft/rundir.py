"""Run directories: resolve the name once, find it again after a restart, refuse to clobber a finished run,
and keep track of which checkpoints are complete."""
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sft.config import Config
from sft.errors import UserError
from sft.files import read_json, write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"
COMPLETE_MARKER = ".complete"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class RunDir:
    path: Path
    resumed: bool  # the directory holds an unfinished run that this process continues

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


def slurm_job_key() -> str | None:
    """Identifies this Slurm job across requeues (array tasks each get their own)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def resolve_name(template: str, config: Config, now: datetime) -> str:
    values = {"config": config.config_path.stem if config.config_path else "run",
              "date": now.strftime("%Y%m%d"), "time": now.strftime("%H%M%S")}
    try:
        name = template.format(**values)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(f"output.name: '{template}' uses an unknown placeholder {error}; "
                        f"use {{config}}, {{date}} or {{time}}") from None
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"output.name: '{name}' is not a valid directory name; drop slashes")
    return name


def open_run_dir(config: Config, overwrite: bool, now: datetime | None = None) -> RunDir:
    """The directory this run writes to; a requeued Slurm job gets back the one its first start created."""
    output_dir = Path(config.output.dir)
    job = slurm_job_key()
    name = _find_by_job(output_dir, job, config.output.name) if job else None
    name = name or resolve_name(config.output.name, config, now or datetime.now())
    path = output_dir / name
    manifest = path / MANIFEST
    if path.exists() and not manifest.is_file():
        if any(path.iterdir()):
            raise UserError(f"output: {path} exists and is not an sft run directory; choose another output.name "
                            f"or output.dir")
    elif path.exists() and read_json(manifest).get("status") == "finished":
        if not overwrite:
            raise UserError(f"output: {path} holds a finished run; pass --overwrite to replace it, or choose a new "
                            f"output.name (e.g. add {{time}})")
        shutil.rmtree(path)
    elif path.exists():
        return RunDir(path, resumed=True)
    # Claim the directory with a first manifest at once, so a restart at any later point finds it as ours.
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, {"status": "starting", "name_template": config.output.name, "slurm_job": job})
    return RunDir(path, resumed=False)


def _find_by_job(output_dir: Path, job: str, template: str) -> str | None:
    if not output_dir.is_dir():
        return None
    for manifest in output_dir.glob(f"*/{MANIFEST}"):
        try:
            record = read_json(manifest)
        except (OSError, ValueError):
            continue
        if record.get("slurm_job") == job and record.get("name_template") == template:
            return manifest.parent.name
    return None


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
