"""Run directories: names resolved once, found again by Slurm job, owned by one live run at a time, finished runs
protected, checkpoint markers, the command that resumes a run."""
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from sft.config import Config
from sft.errors import UserError
from sft.files import write_json_atomic
from sft.run.checkpoints import complete_checkpoints, discard_incomplete_checkpoints, mark_complete
from sft.run.directory import RunAlreadyFinished, open_run_dir
from sft.run.naming import resolve_name, resubmit_command, resume_command

NOON = datetime(2026, 11, 25, 12, 0, 0)
SETTINGS = {"task": "classification", "model": {"name": "m"}, "data": {"train": "a"}}


def make_config(tmp_path, name="sft_v1-{date}") -> Config:
    config = Config.model_validate({**SETTINGS, "output": {"dir": str(tmp_path / "runs"), "name": name}})
    config.config_path = tmp_path / "sft_v1.yaml"
    return config


def opened(config: Config, overwrite: bool = False, now: datetime = NOON):
    """Open and give the directory back at once, as a run that ended would."""
    run = open_run_dir(config, overwrite=overwrite, now=now)
    run.release()
    return run


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID",
                 "SFT_SLURM_JOBS"):
        monkeypatch.delenv(name, raising=False)


def test_name_placeholders(tmp_path):
    config = make_config(tmp_path)
    assert resolve_name("{config}-{date}-{time}", config, NOON) == "sft_v1-20261125-120000"
    with pytest.raises(UserError, match=r"output.name: .* unknown placeholder 'user'"):
        resolve_name("{user}", config, NOON)
    with pytest.raises(UserError, match="not a valid directory name"):
        resolve_name("a/b", config, NOON)


def test_unfinished_run_is_resumed_and_finished_run_refused(tmp_path):
    config = make_config(tmp_path)
    first = opened(config)
    assert first.path == tmp_path / "runs" / "sft_v1-20261125" and not first.resumed
    write_json_atomic(first.path / "manifest.json", {"status": "running", "name_template": config.output.name})
    assert opened(config).resumed

    write_json_atomic(first.path / "manifest.json", {"status": "finished"})
    (first.path / "final").mkdir()
    with pytest.raises(UserError, match="holds a finished run; pass --overwrite"):
        opened(config)
    assert (first.path / "final").is_dir()
    replaced = opened(config, overwrite=True)
    assert not replaced.resumed and not (replaced.path / "final").exists()


@pytest.mark.parametrize("status", ["failed", "preempted", "interrupted", "running"])
def test_overwrite_starts_an_unfinished_run_over(tmp_path, monkeypatch, status):
    config = make_config(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "700")
    path = opened(config).path
    write_json_atomic(path / "manifest.json", {"status": status, "slurm_job": "700", "restarts": [],
                                               "name_template": config.output.name})
    (path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    mark_complete(path / "checkpoints" / "checkpoint-3")
    (path / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeue reruns the same command, --overwrite included
    assert opened(config, overwrite=True).resumed and (path / "checkpoints" / "checkpoint-3").is_dir()

    monkeypatch.setenv("SLURM_JOB_ID", "701")  # a new submission with --overwrite: a fresh run
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    fresh = opened(config, overwrite=True)
    assert fresh.path == path and not fresh.resumed
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "run.lock"]
    assert json.loads((path / "manifest.json").read_text())["slurm_job"] == "701"


def test_foreign_directory_is_never_taken_over(tmp_path):
    config = make_config(tmp_path, name="mine")
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "thesis.tex").write_text("do not touch")
    with pytest.raises(UserError, match="exists and is not an sft run directory"):
        opened(config, overwrite=True)
    assert (tmp_path / "runs" / "mine" / "thesis.tex").read_text() == "do not touch"


def test_requeued_job_finds_its_directory_after_midnight(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = opened(config)
    write_json_atomic(first.path / "manifest.json", {"status": "preempted", "slurm_job": "4242",
                                                     "name_template": config.output.name})
    next_day = datetime(2026, 11, 26, 0, 5)
    again = opened(config, now=next_day)
    assert again.path == first.path and again.resumed
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job, next day: a new run
    assert opened(config, now=next_day).path.name == "sft_v1-20261126"


def test_array_tasks_are_told_apart(tmp_path, monkeypatch):
    config = make_config(tmp_path, name="sweep-{time}")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    runs = {}
    for task, second in (("0", 1), ("1", 2)):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        run = opened(config, now=NOON.replace(second=second))
        write_json_atomic(run.path / "manifest.json", {"status": "running", "slurm_job": f"77_{task}",
                                                       "name_template": config.output.name})
        runs[task] = run.path
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert opened(config, now=NOON.replace(second=9)).path == runs["0"] != runs["1"]


def test_only_marked_checkpoints_count_and_unmarked_ones_are_discarded(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (3, 6, 9, 12):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
    for step in (3, 9):
        mark_complete(checkpoints / f"checkpoint-{step}")
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-3", "checkpoint-9"]
    removed = discard_incomplete_checkpoints(checkpoints)
    assert sorted(p.name for p in removed) == ["checkpoint-12", "checkpoint-6"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-9"]


def test_a_new_directory_is_claimed_with_a_first_manifest(tmp_path, monkeypatch):
    """A job killed before training started still finds its directory on restart (never 'not an sft run')."""
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    config = make_config(tmp_path)
    run = opened(config)
    (run.path / "sft_log_20261125_120000.log").write_text("started\n")
    again = opened(config)
    assert again.path == run.path and again.resumed


def test_resume_command_pins_the_resolved_name_and_quotes_for_the_shell(tmp_path):
    config = make_config(tmp_path / "my configs", name="{config}-{time}")
    command = resume_command(config, "sft_v1-120000", ["training.learning_rate=1e-4", "output.name={config}-{time}",
                                                       "data.train=it's here.jsonl"], "my .env")
    assert shlex.split(command) == ["sft", "train", str(tmp_path / "my configs" / "sft_v1.yaml"), "--env-file",
                                    "my .env", "training.learning_rate=1e-4", "data.train=it's here.jsonl",
                                    "output.name=sft_v1-120000"]
    # A name with braces (from a template's escaped {{ }}) is pinned as a literal name.
    pinned = shlex.split(resume_command(config, "run-{1}", [], None))[-1].removeprefix("output.name=")
    assert resolve_name(pinned, config, NOON) == "run-{1}"


def test_in_a_slurm_job_the_resume_command_is_the_scripts_own_sbatch_line(tmp_path, monkeypatch):
    """train.sbatch records its submission (slurm/common.sh: sft_remember_submission); after a plain scancel sft
    prints it with the run's name pinned: what the user typed, paths relative to the submit directory."""
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "configs").mkdir()
    recorded = subprocess.run(
        ["bash", "-c", 'source "$1/slurm/common.sh"; sft_remember_submission train.sbatch "$2" "${@:3}"; '
                       'echo "$SFT_SBATCH_COMMAND"', "-", str(repo), str(tmp_path / "configs" / "x.yaml"),
         "training.epochs=1", "data.train=it's here.jsonl", "output.name={config}-{date}"],
        env={**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path)}, capture_output=True, text=True, check=True).stdout
    monkeypatch.setenv("SFT_SBATCH_COMMAND", recorded.strip())
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    script = os.path.relpath(repo / "slurm" / "train.sbatch", tmp_path) if repo.is_relative_to(tmp_path) \
        else str(repo / "slurm" / "train.sbatch")
    assert shlex.split(resubmit_command("x-20261125")) == [
        "sbatch", script, "configs/x.yaml", "training.epochs=1", "data.train=it's here.jsonl", "output.name=x-20261125"]
    monkeypatch.delenv("SLURM_JOB_ID")  # outside a job (the variable leaked into a login shell): sft train's line
    assert resubmit_command("x-20261125") is None


# Ownership, with real processes: OWNER opens the run directory (as rank 0 of a live run does) and keeps it.
OWNER = """
import json, socket, sys, time
from datetime import datetime
from pathlib import Path

settings, host, config_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
if host:
    socket.gethostname = lambda: host  # as if on another node of a shared filesystem
from sft.config import Config
from sft.run.directory import open_run_dir

config = Config.model_validate(settings)
config.config_path = Path(config_path)
run = open_run_dir(config, overwrite=False, now=datetime(2026, 11, 25, 12))  # holds run.lock while alive
print("owner", flush=True)
time.sleep(600)
"""


@pytest.fixture
def owners(owner_processes):
    """start(config, host=None, env=None): a live process that owns config's run directory."""
    def start(config: Config, host: str | None = None, env: dict | None = None) -> subprocess.Popen:
        settings = {**SETTINGS, "output": config.output.model_dump()}
        return owner_processes(OWNER, json.dumps(settings), host or "", str(config.config_path),
                               env={**os.environ, **(env or {})})

    return start


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_live_run_is_refused_naming_its_owner_and_a_killed_one_is_resumed(tmp_path, owners):
    config = make_config(tmp_path)
    owner = owners(config)
    path = tmp_path / "runs" / "sft_v1-20261125"
    before = snapshot(path)
    with pytest.raises(UserError) as refused:
        open_run_dir(config, overwrite=True, now=NOON)
    message = str(refused.value)
    assert f"belongs to a run that is still going (host {socket.gethostname()}, pid {owner.pid}, since " in message
    assert f"stop it (kill {owner.pid} on {socket.gethostname()})" in message and "new output.name" in message
    assert "\n" not in message
    assert snapshot(path) == before, "a refused run must not write into the directory"

    kill(owner)
    run = open_run_dir(config, overwrite=False, now=NOON)
    assert run.resumed and json.loads((path / "run.lock").read_text())["pid"] == os.getpid()
    run.release()


def test_the_same_slurm_job_resumes_after_a_requeue_and_another_job_is_refused(tmp_path, owners, monkeypatch):
    config = make_config(tmp_path, name="{config}-{time}")
    owner = owners(config, env={"SLURM_JOB_ID": "500"})
    monkeypatch.setenv("SLURM_JOB_ID", "501")  # another job with a fixed name: the report's job 1002
    with pytest.raises(UserError, match=r"pid \d+, Slurm job 500, .*stop it \(scancel 500\)"):
        open_run_dir(make_config(tmp_path, name="sft_v1-120000"), overwrite=False, now=NOON)
    monkeypatch.setenv("SLURM_JOB_ID", "500")  # a second step of the same job on the same node (salloc)
    with pytest.raises(UserError, match="Slurm job 500"):
        open_run_dir(config, overwrite=False, now=NOON)

    kill(owner)
    run = open_run_dir(config, overwrite=False, now=NOON.replace(hour=18))  # the requeue, hours later
    assert run.path.name == "sft_v1-120000" and run.resumed
    run.release()


def test_a_requeue_on_another_node_replaces_the_stale_lock_of_its_first_node(tmp_path, owners, monkeypatch):
    config = make_config(tmp_path)
    # Still holds its flock, as NFS does for a node that crashed, until the node reboots.
    owners(config, host="node-gone", env={"SLURM_JOB_ID": "500"})
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue
    monkeypatch.setenv("SLURM_JOB_ID", "501")
    with pytest.raises(UserError, match="host node-gone, pid .*Slurm job 500"):
        open_run_dir(config, overwrite=False, now=NOON)

    monkeypatch.setenv("SLURM_JOB_ID", "500")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run = open_run_dir(config, overwrite=False, now=NOON)
    assert run.resumed
    monkeypatch.setenv("SLURM_JOB_ID", "501")  # the new lock is really held
    with pytest.raises(UserError, match=f"host {socket.gethostname()}, pid {os.getpid()}, Slurm job 500"):
        open_run_dir(config, overwrite=False, now=NOON)
    run.release()


def test_a_sibling_step_of_the_same_job_is_refused_and_only_a_requeue_takes_over(tmp_path, owners, monkeypatch):
    """Two `srun` steps of one allocation (two seeds, one `{config}-{date}` name): same job id, same restart count.
    The owner runs on another node, whose flock this filesystem sees held."""
    config = make_config(tmp_path)
    owners(config, host="node-a", env={"SLURM_JOB_ID": "500", "SLURM_STEP_ID": "0"})
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue
    monkeypatch.setenv("SLURM_JOB_ID", "500")
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    with pytest.raises(UserError, match=r"host node-a, pid \d+, Slurm job 500, step 0, .*stop it \(scancel 500\.0\)"):
        open_run_dir(config, overwrite=False, now=NOON)
    assert json.loads((tmp_path / "runs" / "sft_v1-20261125" / "run.lock").read_text())["host"] == "node-a"

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job requeued: Slurm ended every process of its first start
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    run = open_run_dir(config, overwrite=False, now=NOON)
    owner = json.loads((run.path / "run.lock").read_text())
    assert run.resumed and (owner["pid"], owner["slurm_restart_count"]) == (os.getpid(), 1)
    run.release()


@pytest.mark.parametrize("state, live", [("RUNNING", True), ("PENDING", True), ("COMPLETED", False), ("", False)])
def test_another_jobs_run_from_another_node_is_live_while_squeue_lists_it(tmp_path, monkeypatch, state, live):
    """Where flock is local to each node, squeue is what tells (PENDING: preempted and waiting to be requeued)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    # Stands in for Slurm's squeue: an ended job is listed with its final state for a while, then unknown.
    squeue.write_text(f'#!/bin/sh\necho "$@" > {bin_dir}/args\n'
                      + (f"echo {state}\n" if state else
                         'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n'))
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    config = make_config(tmp_path)
    path = opened(config).path
    (path / "run.lock").write_text(json.dumps({"host": "node7", "pid": 4242, "slurm_job": "600",
                                               "since": "2026-11-25T12:00:00+00:00"}))
    monkeypatch.setenv("SLURM_JOB_ID", "601")
    if live:
        with pytest.raises(UserError, match=r"host node7, pid 4242, Slurm job 600, .*scancel 600"):
            open_run_dir(config, overwrite=False, now=NOON)
    else:
        assert opened(config).resumed
    assert (bin_dir / "args").read_text().split() == ["--noheader", "--jobs", "600", "--format=%T"]


@pytest.mark.parametrize("listed, live", [("601:RUNNING 600:PENDING 77_[1-3]:PENDING", True),
                                          ("601:RUNNING 600:COMPLETING", True), ("601:RUNNING 600:PREEMPTED", False),
                                          ("601:RUNNING", False), (None, False)])
def test_without_squeue_the_jobs_the_sbatch_script_listed_decide(tmp_path, monkeypatch, listed, live):
    """Inside the image there is no squeue: slurm/common.sh passes what squeue listed on the host (SFT_SLURM_JOBS).
    Job 600 owns the run from another node; its flock is not held here (pending for a requeue, or node-local)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue
    config = make_config(tmp_path)
    path = opened(config).path
    (path / "run.lock").write_text(json.dumps({"host": "node7", "pid": 4242, "slurm_job": "600",
                                               "since": "2026-11-25T12:00:00+00:00"}))
    monkeypatch.setenv("SLURM_JOB_ID", "601")
    if listed is not None:
        monkeypatch.setenv("SFT_SLURM_JOBS", listed)
    if live:
        with pytest.raises(UserError, match=r"Slurm job 600, .*scancel 600.*if that run is gone \(its node crashed\), "
                                            rf"delete {path / 'run.lock'} and rerun"):
            open_run_dir(config, overwrite=False, now=NOON)
    else:
        assert opened(config).resumed


def test_without_flock_the_owners_pid_decides_on_its_host(tmp_path, owners, monkeypatch):
    config = make_config(tmp_path)
    owner = owners(config)

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")  # Lustre mounted with noflock

    monkeypatch.setattr("sft.run.lock.fcntl.flock", no_flock)
    with pytest.raises(UserError, match=f"pid {owner.pid}"):
        open_run_dir(config, overwrite=False, now=NOON)
    kill(owner)
    assert opened(config).resumed


def test_a_refused_finished_run_is_left_as_it_was(tmp_path):
    config = make_config(tmp_path)
    path = opened(config).path
    write_json_atomic(path / "manifest.json", {"status": "finished"})
    before = snapshot(path)
    with pytest.raises(UserError, match="holds a finished run"):
        open_run_dir(config, overwrite=False, now=NOON)
    assert snapshot(path) == before


@pytest.mark.parametrize("restarts", [[], [{"slurm_job": "4242", "slurm_restart_count": "1"}]],
                         ids=["finished-in-the-first-start", "finished-after-a-requeue"])
def test_a_requeue_after_the_job_finished_its_run_is_told_it_is_done(tmp_path, monkeypatch, restarts):
    """A signal that hit sft as it exited a finished run got the job requeued, and the next start failed on 'holds
    a finished run' (job FAILED, an afterok chain broken). A later start of the job that finished the run is done
    instead, whatever --overwrite says; the same start of that job, or another job, gets the usual choice."""
    config = make_config(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    path = opened(config).path
    finishing_restart = restarts[-1]["slurm_restart_count"] if restarts else "0"
    write_json_atomic(path / "manifest.json", {"status": "finished", "slurm_job": "4242", "slurm": {},
                                               "name_template": config.output.name, "restarts": restarts})
    (path / "final").mkdir()
    before = snapshot(path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(int(finishing_restart) + 1))
    for overwrite in (False, True):
        with pytest.raises(RunAlreadyFinished, match="already finished; nothing left to do"):
            open_run_dir(config, overwrite=overwrite, now=NOON)
    assert snapshot(path) == before

    monkeypatch.setenv("SLURM_RESTART_COUNT", finishing_restart)  # a second `sft train` in that same start
    with pytest.raises(UserError, match="holds a finished run; pass --overwrite") as refused:
        open_run_dir(config, overwrite=False, now=NOON)
    assert not isinstance(refused.value, RunAlreadyFinished)
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    with pytest.raises(UserError, match="holds a finished run; pass --overwrite") as refused:
        open_run_dir(config, overwrite=False, now=NOON)  # another job resolves the same name
    assert not isinstance(refused.value, RunAlreadyFinished)
