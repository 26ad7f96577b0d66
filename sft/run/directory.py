"""The run directory: open it once per run (a requeued job finds its own again), refuse to clobber a
finished run, and read back the config a run recorded."""
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

from sft.config import Config, load_run_config
from sft.errors import UserError
from sft.run import manifest as manifests
from sft.run.lock import LOCK, acquire, record_owner
from sft.run.naming import resolve_name


@dataclass
class RunDir:
    path: Path
    resumed: bool  # the directory holds an unfinished run that this process continues
    # run.lock, flock-held by the process that opened the directory (rank 0) until release().
    lock: IO | None = field(default=None, repr=False, compare=False)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def release(self) -> None:
        """Let another run have the directory (closing the file drops the flock)."""
        if self.lock:
            self.lock.close()
            self.lock = None

    def __getstate__(self) -> dict:
        # Sent to the other ranks under torchrun: the lock stays with the process that holds it.
        return {**self.__dict__, "lock": None}


def open_run_dir(config: Config, overwrite: bool, now: datetime | None = None) -> RunDir:
    """The directory this run writes to, owned by this process until RunDir.release(); a requeued Slurm job gets
    back the one its first start created. Refused while another live run owns it."""
    output_dir = Path(config.output.dir)
    job = manifests.slurm_job_key()
    name = _find_by_job(output_dir, job, config.output.name) if job else None
    name = name or resolve_name(config.output.name, config, now or datetime.now())
    path = output_dir / name
    if path.is_dir() and manifests.read_manifest(path) is None and any(p.name != LOCK for p in path.iterdir()):
        raise UserError(f"output: {path} exists and is not an sft run directory; choose another output.name "
                        f"or output.dir")
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(path, resumed=False, lock=acquire(path))
    try:
        manifest = manifests.read_manifest(path)
        # A requeue reruns its own command, --overwrite included: it resumes the run its job's last start was
        # running, never replaces it, and is done when that start finished it. Otherwise --overwrite starts over
        # whatever an earlier run left, finished or not.
        requeue = manifest is not None and _later_start_of_its_job(manifest)
        if requeue and manifest.get("status") == "finished":
            raise RunAlreadyFinished(f"output: {path} holds the run this Slurm job ({job}) already finished; "
                                     f"nothing left to do (the job was requeued after the run ended)")
        if manifest and overwrite and not requeue:
            _empty(path)
            manifest = None
        if manifest and manifest.get("status") == "finished":
            raise UserError(f"output: {path} holds a finished run; pass --overwrite to replace it, or choose a new "
                            f"output.name (e.g. add {{time}})")
        record_owner(run.lock)
        if manifest is None:
            manifests.claim_run_dir(path, config.output.name)
        run.resumed = manifest is not None
        return run
    except BaseException:
        run.release()
        raise


class RunAlreadyFinished(UserError):
    """A Slurm job requeued after it finished its run (a signal or an operator's requeue hit it at the end):
    `sft train` exits 0, so the job and any `afterok` dependency succeed, and the run is left as it is."""


def _later_start_of_its_job(manifest: dict) -> bool:
    """The run's last start was this very job, and this is a later start of it (a higher SLURM_RESTART_COUNT): a
    requeue. A second `sft train` within the same start of a job is no requeue."""
    restarts = manifest.get("restarts") or []
    finishing_start = restarts[-1] if restarts else {"slurm_job": manifest.get("slurm_job"),
                                                      "slurm_restart_count": (manifest.get("slurm") or {}).get(
                                                          "SLURM_RESTART_COUNT")}
    job = manifests.slurm_job_key()
    this_start = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    return job is not None and finishing_start.get("slurm_job") == job \
        and this_start > int(finishing_start.get("slurm_restart_count") or 0)


def _find_by_job(output_dir: Path, job: str, template: str) -> str | None:
    if not output_dir.is_dir():
        return None
    for folder in output_dir.iterdir():
        try:
            record = manifests.read_manifest(folder) if folder.is_dir() else None
        except (OSError, ValueError):
            continue
        if record and record.get("slurm_job") == job and record.get("name_template") == template:
            return folder.name
    return None


def _empty(path: Path) -> None:
    """Remove an earlier run for --overwrite, keeping the lock this process holds on the directory."""
    for entry in path.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def take_over(path: Path) -> RunDir:
    """Own an existing run directory without starting a run in it (`sft clean`), so no run starts in it meanwhile;
    refused, naming the owner, while a live run owns it."""
    run = RunDir(path, resumed=False, lock=acquire(path))
    record_owner(run.lock)
    return run


def run_config(run_dir: Path) -> Config:
    """The config the run resolved and recorded in config.yaml."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: missing; it was written by sft train and is needed to use the run")
    try:
        return load_run_config(path)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise UserError(f"{path}: cannot read the run's config ({str(error).splitlines()[0]}); it was written by "
                        f"sft train and should not be edited") from None
