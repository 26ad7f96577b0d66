"""A throwaway PostgreSQL server for the database-source tests: install, initdb, start on a private port, stop.

Used by the `postgres` fixture in tests/data/test_sources_postgres.py; also runnable by hand for debugging:

    python tests/postgres_server.py      # starts a server, prints its URL; Ctrl-C stops it

Facts this relies on (Debian 12, postgresql 15):
- The server binaries live in /usr/lib/postgresql/VERSION/bin, not on PATH.
- postgres refuses to run as root: as root, the data folder belongs to the `postgres` user the package creates,
  and initdb/postgres/pg_ctl run through `runuser -u postgres`.
- Password authentication (scram-sha-256) for every connection, so a wrong password is really refused.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apt_packages import apt_install


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be installed or started on this machine."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def install_if_missing() -> Path:
    """apt-get install postgresql unless a server is already installed; returns its bin folder."""
    if _bin_dir() is None:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise PostgresUnavailable("postgresql is not installed and this is not a root Debian machine to install it on")
        apt_install("postgresql")
    return _bin_dir()


class PostgresServer:
    """One postgres process with its data, socket and log in a private temp folder, listening on 127.0.0.1."""

    def __init__(self, user: str = "sft", password: str = "pg-secret-7391", database: str = "postgres"):
        self.user, self.password, self.database = user, password, database
        self.port = _free_port()
        self.root: Path | None = None
        self._process: subprocess.Popen | None = None

    def url(self, password: str | None = None, port: int | None = None) -> str:
        return (f"postgresql://{self.user}:{password or self.password}@127.0.0.1:{port or self.port}/"
                f"{self.database}")

    def _as_owner(self, *command: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)

    def start(self, timeout: float = 60) -> None:
        bin_dir = install_if_missing()
        # Not under pytest's tmp_path: its parent is private to root, and the server runs as `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="sft-postgres-"))
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(password_file, "postgres")
        data = self.root / "data"
        subprocess.run(self._as_owner(str(bin_dir / "initdb"), "-D", str(data), "-U", self.user, "-E", "UTF8",
                                      f"--pwfile={password_file}", "--auth=scram-sha-256"),
                       check=True, capture_output=True)
        log = open(self.root / "server.log", "w")
        self._process = subprocess.Popen(
            self._as_owner(str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.root),
                           "-c", "listen_addresses=127.0.0.1"), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.3)
        self.stop()
        raise PostgresUnavailable(f"postgres did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def execute(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            for statement in statements:
                connection.execute(statement)

    def stop(self) -> None:
        if self._process is not None:
            bin_dir = _bin_dir()
            subprocess.run(self._as_owner(str(bin_dir / "pg_ctl"), "stop", "-D", str(self.root / "data"), "-m", "fast"),
                           capture_output=True, timeout=60)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "PostgresServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    with PostgresServer() as server:
        print(server.url(), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            sys.exit(0)
