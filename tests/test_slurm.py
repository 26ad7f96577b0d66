"""slurm/*.sbatch against a real single-node Slurm (tests/slurm_cluster.py), running `sft` without a container.

What they check: a tiny run completes under train.sbatch; USR1 mid-run → checkpoint → requeue → the resumed
run ends with exactly the per-step losses and weights of an uninterrupted run (and ignores a checkpoint
that was never completed); a plain scancel checkpoints but is not requeued; a second job is refused on a run
whose job waits in the queue, with sft as in the image (no squeue: the script passes squeue's answer in); a
sweep array gives one run directory per task; train_multi.sbatch runs 2-process gloo DDP through srun + torchrun
(two agents meeting by c10d rendezvous), writes outputs once, survives USR1 + requeue exactly too, shards with
FSDP from the config (accelerate's GPU-only gate lifted by tests/hooks), and finishes a 40 s checkpoint after
SIGTERM;
jupyter.sbatch serves JupyterLab behind a token on the node's address only, with the token in a file only the
user can read and never in the Slurm log (the venv has JupyterLab from container/jupyter.lock, as the image).
The wall-time guard: a job with a 2-minute limit and no --signal checkpoints, requeues and resumes exactly, and
so does one whose saves take 40 s; a job requeued after its run finished exits 0; train.sbatch requeues only
when sft stopped for a requeue (with a fake sft). The guard tests wait out real time limits: ~8 min of the run.
Slurm starts once for this module (~2 s; installing slurm-wlm adds ~10 s); the rest takes ~3 min.
"""
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apt_packages import apt_install
from conftest import REPO, put_in_hub_cache, tiny_lm_config
from slurm_cluster import loss_records, outside_slurm, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM_DIR = REPO / "slurm"
# The tiny model does ~100 steps/s on one core: enough steps that a signal sent after step 10 lands mid-run.
PREEMPT_STEPS = 600
DDP_STEPS = 300  # DDP steps are slower (gloo all-reduce between the two processes)
# The test machine has no GPUs and 2 cores: shrink the scripts' GPU-node requests, keep everything else.
SMALL = ("--cpus-per-task=1",)
# train_multi.sbatch on this one node: two srun tasks, each a torchrun agent with one process, meeting by
# c10d rendezvous -- the same path as 2 nodes x 1 GPU. (The script asks for 4 GPUs; the test node has 2 fake.)
ONE_NODE_TWO_TASKS = ("--nodes=1", "--ntasks-per-node=2", "--gres=gpu:1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The directory jobs are submitted from (their logs/ and runs/ land here)."""
    path = tmp_path_factory.mktemp("submit")
    (path / "logs").mkdir()
    return path


@pytest.fixture(scope="module")
def job_env(slurm_cluster, workdir) -> dict[str, str]:
    """Environment sbatch exports to the jobs: this venv's sft/torchrun, no container, offline, 1 thread."""
    return {**outside_slurm(), "SLURM_CONF": str(slurm_cluster.conf),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "SFT_RUNTIME": "none", "SFT_OUTPUT_DIR": str(workdir / "runs"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def lm_config(tiny_causal_lm, tiny_chat_data, workdir) -> Path:
    import yaml

    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, workdir / "ignored")  # output.dir comes from the script
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, workdir, job_env, lm_config) -> tuple[str, Path]:
    """A train.sbatch run of PREEMPT_STEPS steps that nothing interrupts: (job id, run dir)."""
    job = slurm_cluster.sbatch(*SMALL, str(SLURM_DIR / "train.sbatch"), str(lm_config),
                               f"training.max_steps={PREEMPT_STEPS}", "output.name=uninterrupted",
                               env=job_env, cwd=workdir)
    slurm_cluster.wait(job)
    return job, workdir / "runs" / "uninterrupted"


def test_train_sbatch_completes_a_run_with_provenance_and_total_time(uninterrupted, workdir):
    job, run_dir = uninterrupted
    log = (workdir / "logs" / f"sft-{job}.out").read_text()
    lines = log.strip().splitlines()
    assert lines[0].startswith("== ") and f"job {job} (sft, restart 0) on " in lines[0]
    assert "runtime: none (SFT_RUNTIME=none)" in log and "sft info" in log and "torch" in log
    assert "total time" in lines[-1] and lines[-1].endswith("exit 0")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["slurm_job"] == job and manifest["restarts"] == []
    assert [r["step"] for r in loss_records(run_dir)] == list(range(1, PREEMPT_STEPS + 1))
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, workdir, job_env, lm_config, uninterrupted):
    run_dir = workdir / "runs" / "preempted"
    job = slurm_cluster.sbatch(*SMALL, str(SLURM_DIR / "train.sbatch"), str(lm_config),
                               f"training.max_steps={PREEMPT_STEPS}", "output.name=preempted",
                               env=job_env, cwd=workdir)
    wait_for(lambda: len(loss_records(run_dir)) >= 10, f"job {job} logging 10 steps", slurm_cluster)
    slurm_cluster.signal_batch(job, "USR1")  # what --signal=B:USR1@120 does 2 minutes before the time limit

    # The requeued job waits ~11 s (BeginTime); meanwhile plant a newer checkpoint that never got its
    # .complete marker, as if a kill had hit mid-write. The resumed run must not use it.
    # Restarts turns 1 while the first run may still be COMPLETING; PENDING means it is gone and not yet back.
    wait_for(lambda: (record := slurm_cluster.job(job))["Restarts"] == "1" and record["JobState"] == "PENDING",
              f"job {job} requeued and pending", slurm_cluster)
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / ".complete").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert 10 <= step < PREEMPT_STEPS
    torn = run_dir / "checkpoints" / f"checkpoint-{step + 5}"
    shutil.copytree(checkpoints[0], torn)
    (torn / ".complete").unlink()
    (torn / "model.safetensors").write_bytes(b"truncated")

    slurm_cluster.wait(job)
    log = (workdir / "logs" / f"sft-{job}.out").read_text()
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log
    assert f"job {job} (sft, restart 0)" in log and f"job {job} (sft, restart 1)" in log  # one log, appended
    assert f"resuming from checkpoint-{step}" in log and "removed incomplete checkpoint" in log
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert [(r["slurm_job"], r["slurm_restart_count"], r["resumed_from_step"]) for r in manifest["restarts"]] \
        == [(job, "1", step)]

    # Exactness: every step's loss and every final weight, bit for bit.
    _, baseline = uninterrupted
    assert [(r["step"], r["loss"]) for r in loss_records(run_dir)] \
        == [(r["step"], r["loss"]) for r in loss_records(baseline)]
    _assert_same_weights(run_dir / "final", baseline / "final")


def test_plain_scancel_checkpoints_but_stays_cancelled(slurm_cluster, workdir, job_env, lm_config):
    run_dir = workdir / "runs" / "cancelled"
    job = slurm_cluster.sbatch(*SMALL, str(SLURM_DIR / "train.sbatch"), str(lm_config),
                               f"training.max_steps={PREEMPT_STEPS}", "output.name=cancelled",
                               env=job_env, cwd=workdir)
    wait_for(lambda: len(loss_records(run_dir)) >= 10, f"job {job} logging 10 steps", slurm_cluster)
    subprocess.run(["scancel", job], env=slurm_cluster.env, check=True)  # SIGTERM to the shell and sft
    slurm_cluster.wait(job, states=("CANCELLED",))
    wait_for(lambda: json.loads((run_dir / "manifest.json").read_text())["status"] == "preempted",
              "sft's checkpoint on SIGTERM", slurm_cluster, timeout=30)
    time.sleep(3)  # a requeue would show by now
    record = slurm_cluster.job(job)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0")
    assert len(list((run_dir / "checkpoints").glob("checkpoint-*/.complete"))) == 1
    wait_for(lambda: "total time" in (workdir / "logs" / f"sft-{job}.out").read_text(), "the script's end",
              slurm_cluster, timeout=30)
    log = (workdir / "logs" / f"sft-{job}.out").read_text()
    assert "not requeueing" in log
    # sft printed the sbatch line that resumes the run as a new job; it does.
    resubmit = shlex.split(log.split("sft: preempted; a requeued job resumes by itself, or resume with: ")[1]
                           .splitlines()[0])
    assert resubmit == ["sbatch", str(SLURM_DIR / "train.sbatch"), str(lm_config.relative_to(workdir)),
                        f"training.max_steps={PREEMPT_STEPS}", "output.name=cancelled"]
    again = slurm_cluster.sbatch(*SMALL, *resubmit[1:], env=job_env, cwd=workdir)
    slurm_cluster.wait(again)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["restarts"][0]["resumed_from_step"] >= 10


def test_a_second_job_is_refused_on_a_run_whose_job_waits_in_the_queue_with_no_squeue_in_the_image(
        slurm_cluster, workdir, job_env, lm_config, tmp_path):
    """A preempted job waiting for its requeue holds no flock (as a node-local flock on Lustre shows none from
    another node), and the image has no squeue: what train.sbatch asked squeue on the host is what tells."""
    owner = slurm_cluster.sbatch("--hold", "--wrap=true", env=job_env, cwd=workdir)  # pending until released
    run_dir = workdir / "runs" / "pending-owner"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"status": "preempted", "name": "pending-owner",
                                                       "name_template": "pending-owner", "slurm_job": owner}))
    lock = json.dumps({"host": "node-gone", "pid": 1, "slurm_job": owner, "since": "2026-12-01T12:00:00+00:00"})
    (run_dir / "run.lock").write_text(lock)
    # sft as the image runs it: the same sft, with no Slurm client tools on its PATH.
    image, venv_bin = tmp_path / "image", Path(sys.executable).parent
    image.mkdir()
    (image / "sft").write_text(f'#!/bin/sh\nPATH={venv_bin} exec {venv_bin / "sft"} "$@"\n')
    (image / "sft").chmod(0o755)
    job = slurm_cluster.sbatch(*SMALL, str(SLURM_DIR / "train.sbatch"), str(lm_config), "training.max_steps=2",
                               "output.name=pending-owner", env={**job_env, "PATH": f"{image}:{job_env['PATH']}"},
                               cwd=workdir)
    slurm_cluster.wait(job, states=("FAILED",))
    subprocess.run(["scancel", owner], env=slurm_cluster.env, check=True)
    log = (workdir / "logs" / f"sft-{job}.out").read_text()
    assert f"belongs to a run that is still going (host node-gone, pid 1, Slurm job {owner}, " in log
    assert f"if that run is gone (its node crashed), delete {run_dir / 'run.lock'} and rerun" in log
    assert (run_dir / "run.lock").read_text() == lock and sorted(p.name for p in run_dir.iterdir()) == \
        ["manifest.json", "run.lock"]


@pytest.fixture(scope="module")
def no_signal_script(workdir) -> Path:
    """train.sbatch without its `#SBATCH --signal` line: no warning before the time limit, as at a site that drops
    it or in an interactive session. (It finds common.sh through SFT_SLURM_DIR.)"""
    path = workdir / "train-no-signal.sbatch"
    lines = (SLURM_DIR / "train.sbatch").read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.startswith("#SBATCH --signal")))
    return path


def _guarded_run(slurm_cluster, workdir, job_env, lm_config, script: Path, name: str, limit: str,
                 test_env: dict[str, str], *overrides: str) -> tuple[str, Path, dict]:
    """Submit with a time limit and test-only delays (tests/hooks), wait until the run finishes through its
    requeues: (job id, run dir, manifest)."""
    env = {**job_env, "SFT_SLURM_DIR": str(SLURM_DIR), "PYTHONPATH": str(REPO / "tests" / "hooks"), **test_env}
    job = slurm_cluster.sbatch(*SMALL, f"--time={limit}", str(script), str(lm_config), *overrides,
                               f"output.name={name}", env=env, cwd=workdir)
    records = slurm_cluster.wait(job, timeout=900)
    assert int(records[0]["Restarts"]) >= 1, "the run finished within one time limit: make it longer"
    run_dir = workdir / "runs" / name
    return job, run_dir, json.loads((run_dir / "manifest.json").read_text())


def test_without_a_signal_the_guard_checkpoints_before_the_limit_sized_by_the_slow_saves_it_measured(
        slurm_cluster, workdir, job_env, lm_config, no_signal_script):
    """--time=2 and no --signal; every step slowed by 0.15 s and every checkpoint save by 20 s (tests/hooks), so
    200 steps and their 4 saves cannot fit in one start on any machine. The guard reads the job's end (the script's
    squeue, SFT_JOB_END), measures the first scheduled save (step 50) and starts its stop that much earlier than its
    fixed margin, so the stop's save completes, sft exits 75 and the script requeues before the limit; the run ends
    as an uninterrupted one did, bit for bit."""
    steps = ("training.max_steps=200", "training.save_steps=50")
    baseline = slurm_cluster.sbatch(*SMALL, str(SLURM_DIR / "train.sbatch"), str(lm_config), *steps,
                                    "output.name=slow-save-baseline", env=job_env, cwd=workdir)
    job, run_dir, manifest = _guarded_run(slurm_cluster, workdir, job_env, lm_config, no_signal_script,
                                          "walltime-slow-save", "00:02:00",
                                          {"SFT_TEST_SAVE_DELAY": "20", "SFT_TEST_STEP_DELAY": "0.15"}, *steps)
    slurm_cluster.wait(baseline)
    log = (workdir / "logs" / f"sft-{job}.out").read_text()
    assert "got SIG" not in log and f"requeueing job {job}" in log
    sessions = manifest["sessions"]
    assert [s["ended_by"] for s in sessions] == ["wall-time guard"] * (len(sessions) - 1) + ["finished"]
    assert len(manifest["restarts"]) == len(sessions) - 1 and all(s["seconds_left"] > 0 for s in sessions[:-1])
    first = sessions[0]
    assert len(first["checkpoint_saves_s"]) >= 2 and min(first["checkpoint_saves_s"]) >= 20
    left = float(re.search(r"wall-time guard: (\d+) s left", log)[1])
    assert left > 20 + 30, "the stop began no earlier than a rule that ignores the measured save would start it"
    assert manifest["status"] == "finished"
    reference = workdir / "runs" / "slow-save-baseline"
    assert [(r["step"], r["loss"]) for r in loss_records(run_dir)] \
        == [(r["step"], r["loss"]) for r in loss_records(reference)]
    _assert_same_weights(run_dir / "final", reference / "final")


def test_a_job_requeued_after_its_run_finished_completes_without_touching_it(slurm_cluster, workdir, job_env,
                                                                              lm_config):
    """The issue's last start: a job requeued after its run finished (there: by a USR1 that hit the exiting
    process; here: by scontrol) exits 0 instead of failing on 'holds a finished run'."""
    job = slurm_cluster.sbatch(*SMALL, str(SLURM_DIR / "train.sbatch"), str(lm_config), "training.max_steps=3",
                               "output.name=finished-then-requeued", env=job_env, cwd=workdir)
    slurm_cluster.wait(job)
    final = workdir / "runs" / "finished-then-requeued" / "final" / "model.safetensors"
    written = final.stat().st_mtime_ns
    subprocess.run(["scontrol", "requeue", job], env=slurm_cluster.env, check=True)
    wait_for(lambda: slurm_cluster.job(job)["Restarts"] == "1", f"job {job} requeued", slurm_cluster)
    record = slurm_cluster.wait(job)[0]
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0")
    log = (workdir / "logs" / f"sft-{job}.out").read_text()
    assert "already finished; nothing left to do" in log and final.stat().st_mtime_ns == written


def test_sweep_array_gives_each_task_its_own_run_dir(slurm_cluster, workdir, job_env, lm_config):
    env = {**job_env, "SFT_SWEEP_SEEDS": "1 2", "SFT_SWEEP_LRS": "5e-4"}
    job = slurm_cluster.sbatch(*SMALL, "--array=0-1", str(SLURM_DIR / "sweep.sbatch"), str(lm_config),
                               "training.max_steps=3", env=env, cwd=workdir)
    tasks = slurm_cluster.wait(job)
    assert len(tasks) == 2
    run_dirs = sorted((workdir / "runs").glob(f"tiny-sweep{job}-*"))
    assert [d.name for d in run_dirs] == [f"tiny-sweep{job}-0-lr5e-4-seed1", f"tiny-sweep{job}-1-lr5e-4-seed2"]
    for task, run_dir in enumerate(run_dirs):
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["training"]["seed"] == task + 1 and config["training"]["learning_rate"] == 5e-4
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["slurm_job"] == f"{job}_{task}"
        assert (workdir / "logs" / f"sft-sweep-{job}_{task}.out").is_file()
    losses = [loss_records(d)[0]["loss"] for d in run_dirs]
    assert losses[0] != losses[1]  # different seeds really reached the runs


def test_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("shellcheck is not installed (and this is not a root Debian machine to install it on)")
        apt_install("shellcheck")
    scripts = sorted(SLURM_DIR.glob("*.sbatch")) + [SLURM_DIR / "common.sh"]
    result = subprocess.run(["shellcheck", "--external-sources", f"--source-path={SLURM_DIR}", *map(str, scripts)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sweep_task_outside_the_grid_fails_with_the_range_to_use(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("")
    env = {**outside_slurm(), "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "6", "SFT_RUNTIME": "none"}
    result = subprocess.run(["bash", str(SLURM_DIR / "sweep.sbatch"), str(config)], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "array task 6 but the grid has 3 seeds x 2 rates; use --array=0-5" in result.stderr


def test_sweep_file_gives_each_task_its_line_of_overrides(tmp_path, tiny_causal_lm, tiny_chat_data):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "ignored")))
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# one line per array task\ntraining.seed=5\n\ntraining.seed=6 training.learning_rate=2e-3\n")
    env = {**outside_slurm(), "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1", "SFT_RUNTIME": "none",
           "SFT_SWEEP_FILE": str(sweep), "SFT_OUTPUT_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(SLURM_DIR / "sweep.sbatch"), str(config), "training.max_steps=1"],
                            env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "runs" / "tiny-sweep7-1" / "config.yaml").read_text())
    assert (saved["training"]["seed"], saved["training"]["learning_rate"]) == (6, 2e-3)


def _train_sbatch_with_fake_sft(tmp_path: Path, sft_train: str, job_end: int | None = None):
    """train.sbatch as Slurm would run it (job 77), with fakes on PATH: `sft train` runs the bash in sft_train,
    squeue answers job_end (seconds since the epoch; none: no time limit), scontrol records its calls.
    (completed process, scontrol's calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = {"sft": f'[[ "$1" == info ]] && exit 0\n{sft_train}',
             "scontrol": 'echo "$*" >> "$SCONTROL_CALLS"',
             "squeue": f'echo "$(date -d @{job_end} +%Y-%m-%dT%H:%M:%S) 2:00"' if job_end else "echo 'N/A UNLIMITED'"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "scontrol-calls"
    calls.unlink(missing_ok=True)
    (tmp_path / "config.yaml").touch()
    env = {**outside_slurm(), "SLURM_JOB_ID": "77", "SFT_RUNTIME": "none", "SFT_SLURM_DIR": str(SLURM_DIR),
           "SFT_OUTPUT_DIR": str(tmp_path / "runs"), "PATH": f"{bin_dir}:/usr/bin:/bin", "SCONTROL_CALLS": str(calls)}
    result = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), str(tmp_path / "config.yaml")], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_train_sbatch_requeues_only_when_sft_stopped_for_a_requeue(tmp_path):
    # The 4th start: USR1 hit sft as it exited a finished run (exit 138); the requeue then failed.
    finished, calls = _train_sbatch_with_fake_sft(tmp_path, "kill -USR1 $PPID; sleep 10; exit 0")
    assert finished.returncode == 138 and "got SIGUSR1" in finished.stdout, finished.stdout + finished.stderr
    assert "without stopping for a requeue" in finished.stdout and "requeue 77" not in calls
    # The wall-time guard: exit 75 with no signal at all.
    guarded, calls = _train_sbatch_with_fake_sft(tmp_path, "exit 75")
    assert "requeue 77" in calls and "requeueing job 77" in guarded.stdout, guarded.stdout + guarded.stderr
    # Under torchrun the exit code is the launcher's 1: the stop file says it instead.
    launched, calls = _train_sbatch_with_fake_sft(tmp_path, 'echo stopped > "$SFT_STOP_FILE"; exit 1')
    assert "requeue 77" in calls and not list((tmp_path / "runs").glob(".sft-stop-*")), launched.stdout
    crashed, calls = _train_sbatch_with_fake_sft(tmp_path, "exit 1")
    assert crashed.returncode == 1 and calls == []


def test_train_sbatch_passes_the_job_end_and_reports_a_time_limit_shorter_than_the_signal_lead(tmp_path):
    end = int(time.time()) + 120  # --time=2 under the script's --signal=B:USR1@300: Slurm sends USR1 at once
    result, calls = _train_sbatch_with_fake_sft(tmp_path, 'kill -USR1 $PPID; sleep 1; echo "end=$SFT_JOB_END"',
                                                job_end=end)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"end={end}" in result.stdout
    assert "is shorter than the USR1 lead (300 s" in result.stdout and "got SIGUSR1" in result.stdout
    assert "ignored" in result.stdout and calls == []


@pytest.fixture(scope="module")
def ddp_uninterrupted(slurm_cluster, workdir, job_env, lm_config) -> tuple[str, Path]:
    """train_multi.sbatch: 2 processes, gloo, DDP_STEPS steps, not interrupted: (job id, run dir)."""
    job = slurm_cluster.sbatch(*SMALL, *ONE_NODE_TWO_TASKS, str(SLURM_DIR / "train_multi.sbatch"), str(lm_config),
                               "training.ddp_backend=gloo", f"training.max_steps={DDP_STEPS}", "output.name=ddp",
                               env=job_env, cwd=workdir)
    slurm_cluster.wait(job)
    return job, workdir / "runs" / "ddp"


def test_multi_node_script_runs_two_process_ddp_and_writes_once(ddp_uninterrupted, workdir):
    job, run_dir = ddp_uninterrupted
    log = (workdir / "logs" / f"sft-multi-{job}.out").read_text()
    assert "2 torchrun agents x 1 processes" in log
    records = loss_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, DDP_STEPS + 1))  # each step logged once, not per rank
    # 24 examples, batch 4 per process: one epoch is 3 steps with 2 processes (a single process needs 6).
    assert records[2]["epoch"] == 1.0
    assert len(list(run_dir.glob("sft_log_*.log"))) == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["slurm_job"] == job
    assert sorted(p.name for p in (workdir / "runs").iterdir() if p.name.startswith("ddp")) == ["ddp"]


def test_multi_node_script_survives_usr1_and_resumes_exactly(slurm_cluster, workdir, job_env, lm_config,
                                                             ddp_uninterrupted):
    run_dir = workdir / "runs" / "ddp-preempted"
    job = slurm_cluster.sbatch(*SMALL, *ONE_NODE_TWO_TASKS, str(SLURM_DIR / "train_multi.sbatch"), str(lm_config),
                               "training.ddp_backend=gloo", f"training.max_steps={DDP_STEPS}",
                               "output.name=ddp-preempted", env=job_env, cwd=workdir)
    wait_for(lambda: len(loss_records(run_dir)) >= 10, f"job {job} logging 10 steps", slurm_cluster)
    slurm_cluster.signal_batch(job, "USR1")  # reaches both workers through srun; torchrun ignores it
    slurm_cluster.wait(job)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert [(r["slurm_restart_count"], 10 <= r["resumed_from_step"] < DDP_STEPS) for r in manifest["restarts"]] \
        == [("1", True)]
    _, baseline = ddp_uninterrupted
    assert [(r["step"], r["loss"]) for r in loss_records(run_dir)] \
        == [(r["step"], r["loss"]) for r in loss_records(baseline)]
    _assert_same_weights(run_dir / "final", baseline / "final")


def test_multi_node_script_trains_with_fsdp_from_the_config(slurm_cluster, workdir, job_env, lm_config):
    """accelerate shards only on GPUs; tests/hooks/sitecustomize.py lifts that gate for this CPU-only test."""
    env = {**job_env, "PYTHONPATH": str(REPO / "tests" / "hooks"), "SFT_TEST_FSDP_ON_CPU": "1"}
    job = slurm_cluster.sbatch(*SMALL, *ONE_NODE_TWO_TASKS, str(SLURM_DIR / "train_multi.sbatch"), str(lm_config),
                               "training.ddp_backend=gloo", "training.fsdp='full_shard auto_wrap'",
                               "training.max_steps=6", "training.save_steps=6", "output.name=fsdp",
                               env=env, cwd=workdir)
    slurm_cluster.wait(job)
    run_dir = workdir / "runs" / "fsdp"
    assert [r["step"] for r in loss_records(run_dir)] == list(range(1, 7))
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "finished"
    # Sharded: rank 0 held about half of the parameter values, and the checkpoint is accelerate's FSDP format.
    log = (workdir / "logs" / f"sft-multi-{job}.out").read_text()
    held = float(re.search(r"rank 0 holds ([\d.]+)% of the model's parameter values \(FSDP shards", log)[1])
    assert 45 < held < 55
    assert (run_dir / "checkpoints" / "checkpoint-6" / "pytorch_model_fsdp.bin").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "final")


@pytest.mark.parametrize("scancel, end_state", [(("--signal=TERM", "--batch"), "FAILED"), ((), "CANCELLED")],
                         ids=["term-to-batch-shell", "plain-scancel"])
def test_multi_node_script_finishes_a_slow_checkpoint_on_sigterm(slurm_cluster, workdir, job_env, lm_config,
                                                                 scancel, end_state):
    """srun SIGKILLs its step when it gets SIGTERM, torchrun its workers 30 s after its own SIGTERM; the script
    keeps both out of it, so a checkpoint that takes 40 s (a test-only delay in every save) still completes.
    TERM to the batch shell only: the script passes it on. A plain scancel, as preemption does: Slurm sends
    TERM to every process of the job, then SIGKILL after KillWait (90 s here)."""
    run_dir = workdir / "runs" / f"ddp-sigterm-{end_state.lower()}"
    env = {**job_env, "PYTHONPATH": str(REPO / "tests" / "hooks"), "SFT_TEST_SAVE_DELAY": "40"}
    job = slurm_cluster.sbatch(*SMALL, *ONE_NODE_TWO_TASKS, str(SLURM_DIR / "train_multi.sbatch"), str(lm_config),
                               "training.ddp_backend=gloo", f"training.max_steps={DDP_STEPS}",
                               f"output.name={run_dir.name}", env=env, cwd=workdir)
    # Two torchrun agents start slowly on a loaded 2-core machine (minutes at worst).
    wait_for(lambda: len(loss_records(run_dir)) >= 10, f"job {job} logging 10 steps", slurm_cluster, timeout=400)
    subprocess.run(["scancel", *scancel, job], env=slurm_cluster.env, check=True)
    slurm_cluster.wait(job, timeout=300, states=(end_state,))  # the workers' exit 75 is not requeued
    # A cancelled job shows CANCELLED while its processes still finish: wait for sft to record the checkpoint.
    wait_for(lambda: json.loads((run_dir / "manifest.json").read_text())["status"] == "preempted",
              "sft's checkpoint on SIGTERM", slurm_cluster, timeout=80)
    checkpoints = list((run_dir / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / ".complete").is_file()
    log = (workdir / "logs" / f"sft-multi-{job}.out").read_text()
    assert "got SIGTERM" in log and "requeueing job" not in log


def test_jupyter_sbatch_serves_lab_behind_a_token_and_prints_the_tunnel(slurm_cluster, workdir, job_env, tmp_path):
    import urllib.error
    import urllib.request

    home = tmp_path / "home"  # the connection file and Jupyter's runtime files land here, not in root's home
    home.mkdir()
    extra = ["--allow-root"] if os.geteuid() == 0 else []  # Jupyter refuses root; the tests here run as root
    job = slurm_cluster.sbatch(*SMALL, str(SLURM_DIR / "jupyter.sbatch"), *extra, env={**job_env, "HOME": str(home)},
                               cwd=workdir)
    log_path = workdir / "logs" / f"sft-jupyter-{job}.out"
    connection = home / ".sft" / f"jupyter-{job}.txt"
    wait_for(connection.is_file, f"job {job} connection file", slurm_cluster)
    assert stat.S_IMODE(connection.stat().st_mode) == 0o600, "the token must be readable by the user alone"
    assert stat.S_IMODE(connection.parent.stat().st_mode) == 0o700
    details = connection.read_text()
    node = socket.gethostname()
    tunnel = re.search(r"on your computer: (ssh -N -L (\d+):([\w.-]+):\2 \S+@\S+)", details)
    url = re.search(r"then open: +(http://localhost:(\d+)/lab\?token=(\w+))", details)
    port, token = int(tunnel[2]), url[3]
    assert tunnel[3] == node and int(url[2]) == port and len(token) >= 32
    api = url[1].replace("/lab?", "/api/status?")

    def answers() -> bool:
        try:
            return urllib.request.urlopen(api, timeout=2).status == 200  # with the token: accepted
        except (urllib.error.URLError, ConnectionError):
            return False

    wait_for(answers, "JupyterLab answering", slurm_cluster, timeout=90)
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(api.split("?")[0], timeout=2)  # no token, no access
    # It listens on the node name's addresses (where the printed tunnel connects), on no other interface.
    node_addresses = {info[4][0] for info in socket.getaddrinfo(node, port, type=socket.SOCK_STREAM)}
    assert _listening_addresses(port) == node_addresses
    others = {"127.0.0.1", _outbound_address()} - node_addresses - {None}
    assert others, "no second address on this machine to check the binding against"
    for address in others:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=2).close()
    log = log_path.read_text()
    assert tunnel[1] in log and str(connection) in log, "the log says how to connect and where the URL is"
    subprocess.run(["scancel", job], env=slurm_cluster.env, check=True)
    slurm_cluster.wait(job, states=("CANCELLED",))
    wait_for(lambda: "total time" in log_path.read_text(), f"job {job} shutting down", slurm_cluster, timeout=30)
    assert token not in log_path.read_text(), "the Slurm log is readable by others: no token in it"
    assert not connection.exists(), "the connection file goes with the server"


def test_jupyter_sbatch_without_jupyter_says_how_to_get_it(tmp_path):
    bin_dir = tmp_path / "bin"  # sft from this venv, but no jupyter anywhere on PATH
    bin_dir.mkdir()
    (bin_dir / "sft").symlink_to(Path(sys.executable).parent / "sft")
    path = f"{bin_dir}:/usr/bin:/bin"
    assert shutil.which("jupyter", path=path) is None
    result = subprocess.run(["bash", str(SLURM_DIR / "jupyter.sbatch")], cwd=tmp_path, capture_output=True, text=True,
                            env={**outside_slurm(), "PATH": path, "SFT_RUNTIME": "none", "HOME": str(tmp_path)},
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert "jupyter is not on PATH" in result.stderr and "pip install -r container/jupyter.lock" in result.stderr


@pytest.mark.parametrize("script", ["train_multi.sbatch", "jupyter.sbatch"])
def test_scripts_that_cannot_run_under_podman_refuse_it_in_one_line(tmp_path, script):
    env = {**outside_slurm(), "SLURM_JOB_ID": "7", "SFT_SLURM_DIR": str(SLURM_DIR), "SFT_RUNTIME": "podman",
           "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(SLURM_DIR / script), "c.yaml"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"sft: error: {script} does not run under SFT_RUNTIME=podman (")
    assert list(tmp_path.iterdir()) == []  # refused before it creates runs/ or .cache/


def test_podman_runtime_without_the_image_says_how_to_get_it(tmp_path):
    if not shutil.which("podman"):
        pytest.skip("podman is not installed")
    (tmp_path / "c.yaml").touch()
    env = {**outside_slurm(), "SFT_RUNTIME": "podman", "SFT_IMAGE": "localhost/sft-missing:none"}
    result = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), "c.yaml"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "image localhost/sft-missing:none is not in podman's image store" in result.stderr
    assert "podman load -i build/sft-oci.tar" in result.stderr


def test_runtime_none_without_sft_on_path_uses_the_venv_next_to_the_scripts(tmp_path):
    """A shell that never activated .venv (README: make demo, then sbatch) still gets its sft, torchrun and
    jupyter: before, jupyter.sbatch died with `jupyter: command not found`."""
    venv_bin = SLURM_DIR.parent / ".venv" / "bin"
    if not (venv_bin / "jupyter").exists():
        pytest.skip("no .venv with JupyterLab next to slurm/ (make venv builds it)")
    found = subprocess.run(["bash", "-c", f"source {SLURM_DIR}/common.sh && sft_setup && command -v sft torchrun jupyter"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env={**outside_slurm(), "PATH": "/usr/bin:/bin", "SFT_RUNTIME": "none"})
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(venv_bin / name) for name in ("sft", "torchrun", "jupyter")]


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of sockets listening on port, from /proc/net/tcp and tcp6 (0.0.0.0 / :: = all)."""
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        table = Path("/proc/net") / name
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            fields = line.split()
            address, local_port = fields[1].split(":")
            if fields[3] == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word of the address in host byte order (little-endian on x86/arm).
                words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
                if sys.byteorder == "little":
                    words = [word[::-1] for word in words]
                found.add(socket.inet_ntop(family, b"".join(words)))
    return found


def _outbound_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        return probe.getsockname()[0]


def _assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    different = [name for name in left if not left[name].equal(right[name])]
    assert not different, f"weights differ: {different}"


def test_cluster_guide_venv_path_shares_one_cache_without_hf_home(slurm_cluster, tiny_causal_lm, tiny_chat_data,
                                                                   tmp_path):
    """docs/cluster.md's venv path, as a newcomer runs it from the project directory with no HF_HOME: a hub model in
    ./.cache/huggingface (where `sft fetch` puts it), a config in configs/ naming data/ relatively; `sft check` and
    `sft prepare` on the login node, the SFT_RUNTIME=none job, and `sft clean` all use that one cache."""
    project = tmp_path / "project"
    put_in_hub_cache(tiny_causal_lm, project / ".cache" / "huggingface" / "hub")
    for folder in ("configs", "data", "logs"):
        (project / folder).mkdir()
    shutil.copy(tiny_chat_data, project / "data" / "chat.jsonl")
    config = tiny_lm_config(tiny_causal_lm, Path("data/chat.jsonl"), project / "runs", max_steps=2)
    config["model"]["name"] = "org/tiny"
    (project / "configs" / "tiny.yaml").write_text(json.dumps(config))
    env = {name: value for name, value in outside_slurm().items() if name not in ("HF_HOME", "HF_HUB_CACHE")}
    env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SLURM_CONF": str(slurm_cluster.conf)}
    cache = project / ".cache" / "huggingface"

    def sft(*args):
        result = subprocess.run(["sft", *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    sft("check", "configs/tiny.yaml")
    sft("prepare", "configs/tiny.yaml")
    [tokenized] = [entry for entry in (cache / "sft" / "tokenized").iterdir() if entry.is_dir()]
    job = slurm_cluster.sbatch(*SMALL, str(SLURM_DIR / "train.sbatch"), "configs/tiny.yaml", "output.name=walk",
                               env={**env, "SFT_RUNTIME": "none"}, cwd=project)
    slurm_cluster.wait(job)
    run_dir = project / "runs" / "walk"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["hf_home"] == str(cache)
    assert manifest["data"]["cache_key"] == tokenized.name  # the job used what the login node prepared
    assert "tokenized data cache" in sft("clean", "runs/walk") and not tokenized.exists()
