"""Private PostgreSQL and Redis servers that fault tests may stop, restart and break.

The shared servers of the test run are never touched: each fixture here starts a
server of its own on a port of its own, and removes it afterwards. When the server
programs are missing (or cannot run here) the tests that need them are skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ROOT, process_env
from tests.waiting import wait_until

# Ports (and the cluster's name) may be moved, for test runs side by side on one machine.
PG_VERSION = "15"
# Other ports (and so another cluster) for test runs side by side on one machine.
PG_PORT = int(os.environ.get("DS_PRIVATE_PG_PORT", "5441"))
PG_CLUSTER = os.environ.get(
    "DS_PRIVATE_PG_CLUSTER", "dsfaults" if PG_PORT == 5441 else f"dsfaults{PG_PORT}"
)
PG_DATABASE = "ds_faults"
REDIS_PORT = int(os.environ.get("DS_PRIVATE_REDIS_PORT", "6391"))

_TRUST = """\
local   all all              trust
host    all all 127.0.0.1/32 trust
host    all all ::1/128      trust
"""


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _run(*command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


class PrivatePostgres:
    """A PostgreSQL cluster of its own (``pg_createcluster``), with trust authentication."""

    def __init__(self, version: str = PG_VERSION, name: str = PG_CLUSTER, port: int = PG_PORT):
        self.version, self.name, self.port = version, name, port
        self.config_dir = Path("/etc/postgresql") / version / name

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{PG_DATABASE}"

    def _ctl(self, *action: str) -> None:
        done = _run("pg_ctlcluster", self.version, self.name, *action)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctlcluster {' '.join(action)}: {done.stderr or done.stdout}")

    def create(self) -> None:
        self.drop()  # what a killed earlier run may have left
        done = _run("pg_createcluster", self.version, self.name, "--port", str(self.port))
        if done.returncode != 0:
            pytest.skip(f"pg_createcluster could not create a cluster: {done.stderr.strip()}")
        (self.config_dir / "pg_hba.conf").write_text(_TRUST)
        with (self.config_dir / "postgresql.conf").open("a") as conf:
            # A test cluster: speed over durability (restarts here are clean ones).
            conf.write("\nfsync = off\nlisten_addresses = '127.0.0.1'\nmax_connections = 200\n")
        self.start()
        created = _run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                       "-c", f"CREATE DATABASE {PG_DATABASE}")  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"CREATE DATABASE failed: {created.stderr}")

    def start(self) -> None:
        self._ctl("start")
        wait_until(lambda: _accepts(self.port), timeout=30, what="the private PostgreSQL")

    def stop(self) -> None:
        """Stop at once: sessions are terminated, as in a restart of a production server."""
        self._ctl("stop", "-m", "fast")

    def drop(self) -> None:
        if self.config_dir.exists():
            _run("pg_dropcluster", self.version, self.name, "--stop")

    def migrate(self) -> None:
        _migrate(self.url, "the private cluster", timeout=120)


def _serve(
    args: list[str], *, port: int, what: str, timeout: float, output: Any
) -> subprocess.Popen[bytes]:
    """Start a server process and wait until it accepts connections on ``port``."""
    process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)
    wait_until(lambda: _accepts(port) or process.poll() is not None, timeout=timeout, what=what)
    if process.poll() is not None:
        raise RuntimeError(f"{what} exited with {process.returncode}")
    return process


def _migrate(database_url: str, what: str, *, timeout: float) -> None:
    """Create the project's tables on a private server, in a process of the test project."""
    done = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=django_env(database_url),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed on {what}:\n{done.stderr}")


def django_env(database_url: str, redis_url: str = "") -> dict[str, str]:
    """The environment of a process of the test project that uses the private servers."""
    return process_env(
        DATABASE_URL=database_url,
        DS_TEST_DB_NAME=database_url.rsplit("/", 1)[1],
        REDIS_URL=redis_url,
    )


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster with the project's tables, dropped after the module."""
    if shutil.which("pg_createcluster") is None or shutil.which("pg_ctlcluster") is None:
        pytest.skip("pg_createcluster is not installed: no private PostgreSQL cluster")
    if _accepts(PG_PORT) and not (Path("/etc/postgresql") / PG_VERSION / PG_CLUSTER).exists():
        pytest.skip(f"port {PG_PORT} is taken by a server these tests do not own")
    cluster = PrivatePostgres()
    try:
        cluster.create()
        cluster.migrate()
        yield cluster
    finally:
        cluster.drop()


class PrivateRedis:
    """A redis-server of its own: no persistence, in a temporary directory."""

    def __init__(self, port: int = REDIS_PORT) -> None:
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="ds-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = _serve(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],  # fmt: skip
            port=self.port,
            what="the private redis-server",
            timeout=15,
            output=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        wait_until(lambda: not _accepts(self.port), timeout=10, what="redis-server to stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: no private Redis")
    if _accepts(REDIS_PORT):
        pytest.skip(f"port {REDIS_PORT} is taken by a server these tests do not own")
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.remove()


MARIADB_PORT = int(os.environ.get("DS_PRIVATE_MARIADB_PORT", "3316"))
MARIADB_DATABASE = "ds_faults"


class PrivateMariaDB:
    """A mariadbd of its own (``mariadb-install-db``) in a temporary directory, root without
    a password."""

    def __init__(self, port: int = MARIADB_PORT) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="ds-mariadb-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{MARIADB_DATABASE}"

    def create(self) -> None:
        done = _run(
            "mariadb-install-db", "--no-defaults", f"--datadir={self.dir / 'data'}",
            "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db",
            timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"mariadb-install-db could not create a server: {done.stderr.strip()}")
        self.start()
        self.sql(f"CREATE DATABASE {MARIADB_DATABASE} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")

    def sql(self, statement: str) -> str:
        done = _run("mariadb", "-h", "127.0.0.1", "-P", str(self.port), "-u", "root",
                    "-N", "-B", "-e", statement)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{statement}: {done.stderr}")
        return done.stdout

    def start(self) -> None:
        with (self.dir / "server.log").open("ab") as log:
            self.process = _serve(
                ["mariadbd", "--no-defaults", f"--datadir={self.dir / 'data'}",
                 f"--port={self.port}", "--bind-address=127.0.0.1",
                 f"--socket={self.dir / 'mariadb.sock'}", "--user=root", "--skip-log-bin",
                 # A test server: a killed mariadbd loses nothing committed (the log is in
                 # the OS's cache); only a crash of the machine would.
                 "--innodb-flush-log-at-trx-commit=2", "--innodb-buffer-pool-size=64M",
                 "--max-connections=300"],
                port=self.port, what="the private MariaDB", timeout=60, output=log,
            )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL: the server dies mid-transaction and recovers from its log at start."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        wait_until(lambda: not _accepts(self.port), timeout=30, what="the port to close")

    def drop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def migrate(self) -> None:
        _migrate(self.url, "the private MariaDB", timeout=180)


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[PrivateMariaDB]:
    """A private MariaDB server with the project's tables, removed after the module."""
    if shutil.which("mariadb-install-db") is None or shutil.which("mariadbd") is None:
        pytest.skip("mariadb-install-db is not installed: no private MariaDB server")
    pytest.importorskip("MySQLdb", reason="the mysql extra (mysqlclient) is not installed")
    if _accepts(MARIADB_PORT):
        pytest.skip(f"port {MARIADB_PORT} is taken by a server these tests do not own")
    server = PrivateMariaDB()
    try:
        server.create()
        server.migrate()
        yield server
    finally:
        server.drop()
