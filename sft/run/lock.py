"""run.lock: one live run per run directory, on one node or many, inside Slurm or not."""
import fcntl
import json
import os
import shutil
import socket
import subprocess
from datetime import datetime
from pathlib import Path
from typing import IO

from sft.errors import UserError
from sft.run import manifest as manifests

LOCK = "run.lock"
# squeue states after which a job has no processes left and will not run again.
ENDED_JOB_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL",
                    "DEADLINE", "OUT_OF_MEMORY", "REVOKED"}


# Ownership: run.lock holds an flock for as long as the owning process runs, and names that process inside.
#
# Why not the flock alone: run directories live on NFS or Lustre, where flock may be local to one node (Lustre
# mounted with `localflock`, NFS with `local_lock=flock`), unsupported (Lustre `noflock`), or outlive a node
# that crashed (NFSv3 keeps its locks until the node reboots); and a preempted job waiting in the queue to be
# requeued has no process at all, yet its run is not abandoned. So the owner's host, pid and Slurm job are
# written inside, and:
#   - on the owner's host the kernel's flock is exact (the pid if flock is unsupported);
#   - a restart of the owner's own Slurm job (a higher SLURM_RESTART_COUNT) takes over: Slurm ends every process
#     of a job before it runs the job again, so a lock still held from another node is stale. Another process of
#     the same start (a second `srun` step in one allocation: same job id, same restart count) is no requeue:
#     the flock decides, as between two runs outside Slurm;
#   - another job's run is live while squeue lists that job as not ended (pending for a requeue too), when
#     squeue is at hand (it is one quick query); inside the image, which has none, the sbatch scripts pass in
#     what squeue listed on the host as the job started (SFT_SLURM_JOBS);
#   - otherwise the flock decides. Without squeue, two jobs on different nodes of a filesystem with node-local
#     flock cannot see each other: then only distinct output names keep them apart.

def acquire(path: Path) -> IO:
    """Open and flock PATH/run.lock without writing anything, or raise UserError naming the live owner."""
    lock_path = path / LOCK
    lock = lock_path.open("a+")
    held_elsewhere = _try_flock(lock, fcntl.LOCK_EX)
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
        held_elsewhere = _try_flock(probe, fcntl.LOCK_SH)
    return _owner_running(_read_owner(lock_path), held_elsewhere)


def _try_flock(lock: IO, mode: int) -> bool | None:
    """False when this process now holds the flock (LOCK_EX or LOCK_SH), True when another one holds it, None when
    flock is unsupported (then the owner's pid decides)."""
    try:
        fcntl.flock(lock, mode | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # ENOLCK, EOPNOTSUPP: e.g. Lustre mounted with noflock, NFS without a lock daemon
        return None


def _fresh_lock(lock_path: Path) -> IO:
    temporary = lock_path.with_name(f".{LOCK}.{os.getpid()}")
    lock = temporary.open("a+")
    _try_flock(lock, fcntl.LOCK_EX)  # a new file nobody else has opened: the flock is ours (or there is no flock)
    os.replace(temporary, lock_path)
    return lock


def record_owner(lock: IO) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": manifests.slurm_job_key(),
             "slurm_restart_count": _restart_count(os.environ.get("SLURM_RESTART_COUNT")),
             "slurm_step": os.environ.get("SLURM_STEP_ID"),
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
        requeued = _restart_count(os.environ.get("SLURM_RESTART_COUNT")) > _restart_count(
            owner.get("slurm_restart_count"))
        return not requeued and bool(held_elsewhere) and not here
    if job and (active := _slurm_job_active(job)) is not None:
        return active
    return bool(held_elsewhere) and not here


def _restart_count(value) -> int:
    """SLURM_RESTART_COUNT as a number: unset (a first start; a lock written before sft recorded it) is 0."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


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
    """Whether Slurm still runs (or will run again) this job; None when neither squeue nor the sbatch script
    (SFT_SLURM_JOBS) answers."""
    squeue = shutil.which("squeue")
    if not squeue:
        return _listed_by_the_script(job)
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


def _listed_by_the_script(job: str) -> bool | None:
    """From SFT_SLURM_JOBS: this user's jobs as squeue listed them on the host when the sbatch script started
    (slurm/common.sh), for the image, which has no squeue. A job not listed is unknown (another user's, or the
    variable is missing): None, and the flock decides."""
    listed = os.environ.get("SFT_SLURM_JOBS")
    states = dict(entry.rpartition(":")[::2] for entry in listed.split()) if listed else {}
    return states[job] not in ENDED_JOB_STATES if job in states else None


def _in_use_message(path: Path, owner: dict) -> str:
    if not owner:
        return (f"output: {path} is being opened by another run right now; wait for it, or choose a new "
                f"output.name")
    job, step = owner.get("slurm_job"), owner.get("slurm_step")
    who = f"host {owner.get('host')}, pid {owner.get('pid')}" + (f", Slurm job {job}" if job else "")
    if job and job == manifests.slurm_job_key():  # a sibling step of this very job: stop that step, not the job
        who += f", step {step}"
        stop = f"scancel {job}.{step}" if step else f"kill {owner.get('pid')} on {owner.get('host')}"
    else:
        stop = f"scancel {job}" if job else f"kill {owner.get('pid')} on {owner.get('host')}"
    return (f"output: {path} belongs to a run that is still going ({who}, since {owner.get('since')}); wait for "
            f"it to end, stop it ({stop}) and rerun to resume, or choose a new output.name; if that run is gone "
            f"(its node crashed), delete {path / LOCK} and rerun")
