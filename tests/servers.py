"""Throwaway servers for tests and benchmarks: a PostgreSQL cluster and an `mlflow server`.

Both listen on 127.0.0.1 on a free port, live in a temporary folder and are stopped by their
PID (the postmaster's from `postmaster.pid`; the MLflow server's process group, which holds its
uvicorn workers), never by name.

PostgreSQL refuses to run as root: as root the cluster is initialised and started as the
`postgres` user (`runuser`), in a folder that user owns. `postgres_bin()` finds `initdb` under
/usr/lib/postgresql/*/bin (Debian's packages; `.ci/run` installs them when missing).

    with postgres_cluster() as pg:              # pg.url("optuna"): a new database's URL
        with mlflow_server(pg.url("mlflow"), artifacts_dir) as uri:
            ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_USER, PG_PASSWORD = "pipeline", "pipeline-test"


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return found[-1].parent if found else None


def postgres_missing() -> str | None:
    """Why a PostgreSQL test cannot run here (None when it can)."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; .ci/run adds it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without `runuser`: PostgreSQL cannot be started as root"
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's driver for postgresql:// URLs)
    except ImportError:
        return 'no PostgreSQL driver: pip install -e ".[postgres]"'
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    """`cmd` run as the `postgres` user when we are root (PostgreSQL refuses root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by its parent) counts as stopped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


@dataclass
class Postgres:
    """A running cluster: `url(db)` creates database `db` (owned by PG_USER) and returns its
    SQLAlchemy URL; `pid` is the postmaster's."""

    bin_dir: Path
    folder: Path
    port: int
    pid: int

    def psql(self, sql: str) -> None:
        cmd = [str(self.bin_dir / "psql"), "-h", str(self.folder / "sock"), "-p", str(self.port)]
        subprocess.run(
            _as_owner([*cmd, "-U", "postgres", "-d", "postgres", "-qc", sql]),
            check=True,
            capture_output=True,
            cwd="/",
        )

    def url(self, database: str) -> str:
        self.psql(f'CREATE DATABASE "{database}" OWNER {PG_USER}')
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"


def start_postgres() -> Postgres:
    """initdb + pg_ctl start in a new temp folder; a password user PG_USER over TCP, trust on
    the Unix socket (in the folder) for the administrator only."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb")
    folder = Path(tempfile.mkdtemp(prefix="pg-"))  # in /tmp: the postgres user can reach it
    (folder / "sock").mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(folder / "sock", "postgres", "postgres")
    data, port = folder / "data", free_port()
    run = {"check": True, "capture_output": True, "cwd": "/", "text": True}
    subprocess.run(
        _as_owner(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust"]
            + ["--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"]
        ),
        **run,
    )
    options = f"-p {port} -k {folder / 'sock'} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_owner(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options]
            + ["-l", str(folder / "postgres.log"), "-w", "-t", "60", "start"]
        ),
        **run,
    )
    pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    pg = Postgres(bin_dir, folder, port, pid)
    pg.psql(f"CREATE USER {PG_USER} PASSWORD '{PG_PASSWORD}'")
    return pg


def stop_postgres(pg: Postgres) -> None:
    """Fast shutdown (SIGINT) of the postmaster by its PID; SIGKILL after 30 s; then remove
    the folder."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pg.pid, signal.SIGINT)
    if not _wait_gone(pg.pid, 30):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pg.pid, signal.SIGKILL)
        _wait_gone(pg.pid, 10)
    shutil.rmtree(pg.folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    pg = start_postgres()
    try:
        yield pg
    finally:
        stop_postgres(pg)


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, artifacts_dir: Path, log: Path, timeout_s: float = 120
) -> Iterator[str]:
    """`mlflow server` with `backend_uri` and `--artifacts-destination artifacts_dir` (clients
    upload artifacts through it) on a free local port; yields its http URI once it answers
    /health. Stopped by its process group (SIGTERM, then SIGKILL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri]
    cmd += ["--artifacts-destination", str(artifacts_dir), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for_http(f"{uri}/health", proc, log, timeout_s)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited {proc.returncode}: {log.read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer {url} in {timeout_s} s; see {log}")
