"""A throwaway single-node Slurm cluster for the `slurm` tests: install, configure, start, submit, stop.

Used by the `slurm_cluster` fixture in tests/test_slurm.py; also runnable by hand for debugging:

    python tests/slurm_cluster.py /tmp/slurm     # starts a cluster, prints `export SLURM_CONF=...`; Ctrl-C stops it

Facts about Debian 12's slurm-wlm 22.05 on a machine without systemd, which the config below relies on:
- munged must be started by hand as the munge user, after creating /run/munge; the key exists after install.
- proctrack/linuxproc + task/none need no cgroups; CR_Core (not CR_Core_Memory) ignores memory.
- A requeued job is held ~121 s in `BeginTime` unless AuthInfo=cred_expire is small before slurmctld starts.
- There is no accounting daemon, so `sacct` is unavailable; `scontrol show job` keeps finished jobs MinJobAge s.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from apt_packages import apt_install

MUNGE_SOCKET_DIR = Path("/run/munge")
# Fake GPUs, so the scripts' `--gres=gpu:N` is accepted as written. slurmd drops a GPU without a device file
# and rejects a regular file, so each is a character device with /dev/null's numbers (task/none binds nothing).
FAKE_GPUS = 2


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine (not root, no apt-get, ...)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)


def install_if_missing() -> None:
    """apt-get install slurm-wlm (daemons, clients, munge) unless its binaries are already there."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm is not installed and this is not a root Debian machine to install it on")
    apt_install("slurm-wlm")


class SlurmCluster:
    """slurmctld + slurmd for this host, with all state, logs and config under `root`.

    Clients find it through SLURM_CONF (see `env`); batch jobs inherit that variable, so `scontrol requeue`
    inside a job talks to this cluster too.
    """

    def __init__(self, root: Path, min_job_age: int = 300):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.min_job_age = min_job_age
        self._daemons: list[subprocess.Popen] = []
        self._started_munged = False

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # Lifecycle

    def start(self, timeout: float = 60) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting munged/slurmd needs root")
        install_if_missing()
        self._start_munged()
        self._write_config()
        try:
            # -D: stay in the foreground, so these Popen handles are the daemons and stop() can end exactly them.
            # -c / -i: cold start, ignoring any state a previous run left behind.
            self._spawn("slurmctld", "-D", "-c", "-i", "-f", str(self.conf))
            self._spawn("slurmd", "-D", "-f", str(self.conf))
            self._wait_until_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started (and munged, if it started that)."""
        if self._daemons:
            user = pwd.getpwuid(os.geteuid()).pw_name
            subprocess.run(["scancel", "--full", "--user", user], env=self.env, capture_output=True)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._squeue_ids():
                time.sleep(0.5)
        for proc in reversed(self._daemons):
            proc.terminate()
        for proc in reversed(self._daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._daemons.clear()
        if self._started_munged:
            subprocess.run(["runuser", "-u", "munge", "--", "munged", "--stop"], capture_output=True)
            self._started_munged = False

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # Jobs

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit and return the job id; `env` is the job's environment (sbatch exports it by default)."""
        env = {**(env or self.env), "SLURM_CONF": str(self.conf)}
        result = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (first record; array tasks: pass JOBID_TASK)."""
        out = _run("scontrol", "show", "job", "--oneliner", job_id, env=self.env).stdout
        return _parse_record(out.splitlines()[0])

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """All records of `scontrol show job` (an array job gives one per task)."""
        out = _run("scontrol", "show", "job", "--oneliner", job_id, env=self.env).stdout
        return [_parse_record(line) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float = 180, states: tuple[str, ...] = ("COMPLETED",)) -> list[dict]:
        """Wait until every record of the job is in a final state; fail unless all are in `states`."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in final for r in records):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s: {_summary(records)}")
            time.sleep(0.5)
        if not all(r["JobState"] in states for r in records):
            raise AssertionError(f"job {job_id} ended {_summary(records)}, expected {states}\n" + self.logs_tail())
        return records

    def signal_batch(self, job_id: str, name: str = "USR1") -> None:
        """What `#SBATCH --signal=B:USR1@120` does before the time limit: signal the batch shell only."""
        _run("scancel", f"--signal={name}", "--batch", job_id, env=self.env)

    def logs_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    # Internals

    def _start_munged(self) -> None:
        if (MUNGE_SOCKET_DIR / "munge.socket.2").exists() and subprocess.run(
                ["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving this machine; leave it alone
        if not Path("/etc/munge/munge.key").exists():
            _run("runuser", "-u", "munge", "--", "mungekey", "--create")
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        _run("runuser", "-u", "munge", "--", "munged")
        self._started_munged = True

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        # `slurmd -C` prints this host's NodeName/CPUs/sockets line (and an UpTime line we drop).
        node_line = _run("slurmd", "-C").stdout.splitlines()[0]
        node_name = _parse_record(node_line)["NodeName"]
        r = self.root
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py for one test session.
ClusterName=sfttest
SlurmctldHost={node_name}
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
# Default 120 s: a requeued job would sit ~121 s in BeginTime before it may start again.
AuthInfo=cred_expire=10
# Default 30 s (SIGTERM to SIGKILL on scancel), as long as torchrun's own grace: longer, so that a test can tell
# whether a slow checkpoint was cut short by torchrun.
KillWait=90
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups on this machine.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No slurmdbd here (so no sacct); finished jobs stay in `scontrol show job` for MinJobAge s.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge={self.min_job_age}
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerParameters=sched_interval=2,bf_interval=1
GresTypes=gpu
{node_line} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        for index in range(FAKE_GPUS):
            device = self.root / f"fake-gpu{index}"
            if not device.exists():
                os.mknod(device, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
        (self.root / "gres.conf").write_text(
            f"NodeName={node_name} Name=gpu File={self.root}/fake-gpu[0-{FAKE_GPUS - 1}]\n")

    def _spawn(self, *cmd: str) -> None:
        log = open(self.root / f"{cmd[0]}.stdout", "ab")
        self._daemons.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait_until_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for proc in self._daemons:
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{proc.args[0]} exited with {proc.returncode}\n" + self.logs_tail())
            result = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=self.env,
                                    capture_output=True, text=True)
            state = result.stdout.strip()
            if result.returncode == 0 and state == "idle":
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"node not idle after {timeout} s (state {state!r})\n" + self.logs_tail())

    def _squeue_ids(self) -> list[str]:
        result = subprocess.run(["squeue", "--noheader", "--format=%i"], env=self.env, capture_output=True, text=True)
        return result.stdout.split()


def outside_slurm() -> dict[str, str]:
    """This environment without any SLURM_* variables, as if on a login node (tests may run inside a job)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}


def loss_records(run_dir: Path) -> list[dict]:
    """The training-loss lines a job's run has logged so far (metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [record for line in path.read_text().splitlines() if "loss" in (record := json.loads(line))]


def wait_for(condition, what: str, cluster: SlurmCluster, timeout: float = 120) -> None:
    """Poll CONDITION until it holds; on timeout fail with the cluster's logs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout} s\n{cluster.logs_tail()}")
        time.sleep(0.1)


def _parse_record(line: str) -> dict[str, str]:
    """`Key=Value Key=Value ...` as printed by `scontrol --oneliner` and `slurmd -C` (values have no spaces
    for the keys we read; a value with spaces keeps its first word)."""
    fields = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def _summary(records: list[dict]) -> str:
    return ", ".join(f"{r.get('JobId')}:{r.get('JobState')}(exit {r.get('ExitCode')})" for r in records)


if __name__ == "__main__":
    # SIGTERM too, as a background `&` process ignores Ctrl-C's SIGINT.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sft-slurm")
    with SlurmCluster(root) as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C or SIGTERM stops the cluster", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
