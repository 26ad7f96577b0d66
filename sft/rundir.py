"""Run directories: resolve the name once, find it again after a restart, let one run at a time own it, refuse
to clobber a finished run, and keep track of which checkpoints are complete."""
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

from sft import manifest as manifests
from sft.config import Config
from sft.errors import UserError
from sft.files import follow_umask, is_disk_full, write_text_atomic

LOCK = "run.lock"
COMPLETE_MARKER = ".complete"
FINAL = "final"
# The final model is written here, marked complete, then renamed to final/: final/ always holds a whole model.
FINAL_IN_PROGRESS = ".final.partial"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# squeue states after which a job has no processes left and will not run again.
ENDED_JOB_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL",
                    "DEADLINE", "OUT_OF_MEMORY", "REVOKED"}


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
    run = RunDir(path, resumed=False, lock=_lock(path))
    try:
        manifest = manifests.read_manifest(path)
        if manifest and manifest.get("status") == "finished":
            if not overwrite:
                raise UserError(f"output: {path} holds a finished run; pass --overwrite to replace it, or choose a "
                                f"new output.name (e.g. add {{time}})")
            _empty(path)
            manifest = None
        _record_owner(run.lock)
        if manifest is None:
            manifests.claim_run_dir(path, config.output.name)
        run.resumed = manifest is not None
        return run
    except BaseException:
        run.release()
        raise


def resume_command(config: Config, run_name: str, overrides: list[str], env_file: str | None) -> str:
    """The command that continues this run: the same config and overrides with the name pinned to the resolved
    one ({time} resolves anew in every run, {date} after midnight, and a new Slurm job does not find the old job's
    directory)."""
    words = ["sft", "train", str(config.config_path)]
    if env_file:
        words += ["--env-file", env_file]
    words += [o for o in overrides if o.partition("=")[0].strip() != "output.name"]
    pinned = run_name.replace("{", "{{").replace("}", "}}")  # a literal name, not a template
    return shlex.join([*words, f"output.name={pinned}"])


def resubmit_command(run_name: str) -> str | None:
    """In a job of slurm/'s scripts: the sbatch line that continues this run as a new job (after a plain scancel,
    which is not requeued), from the submission line the script records in SFT_SBATCH_COMMAND, name pinned."""
    submitted = os.environ.get("SFT_SBATCH_COMMAND")
    if not submitted or not os.environ.get("SLURM_JOB_ID"):
        return None
    words = [w for w in shlex.split(submitted) if w.partition("=")[0].strip() != "output.name"]
    pinned = run_name.replace("{", "{{").replace("}", "}}")
    return shlex.join([*words, f"output.name={pinned}"])


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
    """Remove a finished run for --overwrite, keeping the lock this process holds on the directory."""
    for entry in path.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# Ownership: run.lock holds an flock for as long as the owning process runs, and names that process inside.
#
# Why not the flock alone: run directories live on NFS or Lustre, where flock may be local to one node (Lustre
# mounted with `localflock`, NFS with `local_lock=flock`), unsupported (Lustre `noflock`), or outlive a node
# that crashed (NFSv3 keeps its locks until the node reboots); and a preempted job waiting in the queue to be
# requeued has no process at all, yet its run is not abandoned. So the owner's host, pid and Slurm job are
# written inside, and:
#   - on the owner's host the kernel's flock is exact (the pid if flock is unsupported);
#   - a restart of the owner's own Slurm job takes over: Slurm ends every process of a job before it runs the
#     job again, so a lock still held from another node is stale;
#   - another job's run is live while squeue lists that job as not ended (pending for a requeue too), when
#     squeue is at hand (it is one quick query; inside a container it often is not);
#   - otherwise the flock decides. Without squeue, two jobs on different nodes of a filesystem with node-local
#     flock cannot see each other: then only distinct output names keep them apart.

def _lock(path: Path) -> IO:
    """Open and flock PATH/run.lock without writing anything, or raise UserError naming the live owner."""
    lock_path = path / LOCK
    lock = lock_path.open("a+")
    held_elsewhere = _try_flock(lock)
    owner = _read_owner(lock_path)
    if _owner_running(owner, held_elsewhere):
        lock.close()
        raise UserError(_in_use_message(path, owner))
    if held_elsewhere:  # a stale lock (see above): a fresh file with its own flock replaces it
        lock.close()
        lock = _fresh_lock(lock_path)
    return lock


def owner_running(path: Path) -> bool:
    """Whether a live run owns PATH, judged as open_run_dir judges it but without owning it (`sft runs`): the flock
    is only probed (shared, released at once) and nothing is written. A run that starts in the very microseconds of
    the probe sees the flock held and is refused once; rerunning it starts it."""
    lock_path = path / LOCK
    try:
        probe = lock_path.open("r")
    except FileNotFoundError:
        return False
    with probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held_elsewhere: bool | None = False
        except BlockingIOError:
            held_elsewhere = True
        except OSError:  # no flock on this filesystem: the owner's pid decides, as in _lock
            held_elsewhere = None
    return _owner_running(_read_owner(lock_path), held_elsewhere)


def take_over(path: Path) -> RunDir:
    """Own an existing run directory without starting a run in it (`sft clean`), so no run starts in it meanwhile;
    refused, naming the owner, while a live run owns it."""
    run = RunDir(path, resumed=False, lock=_lock(path))
    _record_owner(run.lock)
    return run


def _try_flock(lock: IO) -> bool | None:
    """False when this process now holds the flock, True when another one does, None when flock is unsupported."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # ENOLCK, EOPNOTSUPP: e.g. Lustre mounted with noflock, NFS without a lock daemon
        return None


def _fresh_lock(lock_path: Path) -> IO:
    temporary = lock_path.with_name(f".{LOCK}.{os.getpid()}")
    lock = temporary.open("a+")
    _try_flock(lock)  # a new file nobody else has opened: the flock is ours (or the filesystem has none)
    os.replace(temporary, lock_path)
    return lock


def _record_owner(lock: IO) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": manifests.slurm_job_key(),
             "since": datetime.now().astimezone().isoformat(timespec="seconds")}
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps(owner) + "\n")
    lock.flush()
    os.fsync(lock.fileno())


def _read_owner(lock_path: Path) -> dict:
    """The recorded owner; {} for none yet (a new file, or an owner that has not written itself in yet)."""
    try:
        owner = json.loads(lock_path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _owner_running(owner: dict, held_elsewhere: bool | None) -> bool:
    here = owner.get("host") == socket.gethostname()
    if here and (held_elsewhere if held_elsewhere is not None else _pid_running(owner.get("pid"))):
        return True
    job = owner.get("slurm_job")
    if job and job == manifests.slurm_job_key():
        return False
    if job and (active := _slurm_job_active(job)) is not None:
        return active
    return bool(held_elsewhere) and not here


def _pid_running(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _slurm_job_active(job: str) -> bool | None:
    """Whether Slurm still runs (or will run again) this job; None when squeue is missing or does not answer."""
    squeue = shutil.which("squeue")
    if not squeue:
        return None
    try:
        result = subprocess.run([squeue, "--noheader", "--jobs", job, "--format=%T"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        # A job that ended a while ago is unknown to squeue; any other failure (no controller) tells nothing.
        return False if "Invalid job id" in result.stderr else None
    states = result.stdout.split()
    return bool(states) and states[0] not in ENDED_JOB_STATES


def _in_use_message(path: Path, owner: dict) -> str:
    if not owner:
        return (f"output: {path} is being opened by another run right now; wait for it, or choose a new "
                f"output.name")
    job = owner.get("slurm_job")
    who = f"host {owner.get('host')}, pid {owner.get('pid')}" + (f", Slurm job {job}" if job else "")
    stop = f"scancel {job}" if job else f"kill {owner.get('pid')} on {owner.get('host')}"
    return (f"output: {path} belongs to a run that is still going ({who}, since {owner.get('since')}); wait for "
            f"it to end, stop it ({stop}) and rerun to resume, or choose a new output.name")


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
