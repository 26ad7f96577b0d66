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
        _record_owner(run.lock)
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
    """Remove an earlier run for --overwrite, keeping the lock this process holds on the directory."""
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
#   - a restart of the owner's own Slurm job (a higher SLURM_RESTART_COUNT) takes over: Slurm ends every process
#     of a job before it runs the job again, so a lock still held from another node is stale. Another process of
#     the same start (a second `srun` step in one allocation: same job id, same restart count) is no requeue:
#     the flock decides, as between two runs outside Slurm;
#   - another job's run is live while squeue lists that job as not ended (pending for a requeue too), when
#     squeue is at hand (it is one quick query); inside the image, which has none, the sbatch scripts pass in
#     what squeue listed on the host as the job started (SFT_SLURM_JOBS);
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
