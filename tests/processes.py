"""Real ``runworkers`` processes against the test database, and their environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from django.db import connection

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def process_env(**changes: str | None) -> dict[str, str]:
    """The environment of a process of the test project on the test run's database.

    ``changes`` set variables, or remove them where the value is ``None``.
    """
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        # The database the test run created, not the one named in the settings.
        DS_TEST_DB_NAME=str(connection.settings_dict["NAME"]),
    )
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class WorkerProcess:
    """One ``python -m django runworkers`` process; its output goes to a log file."""

    def __init__(self, worker_id: str, args: Sequence[str], env: dict[str, str], log: Path):
        self.worker_id = worker_id
        self.log_path = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "django", "runworkers", "--worker-id", worker_id, *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.worker_id} pid={self.process.pid}>"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 30.0) -> None:
        wait_until(
            lambda: f"Worker {self.worker_id} started" in self.log() or self.returncode is not None,
            timeout=timeout,
            interval=0.05,
            what=f"{self!r} to start",
        )
        assert self.returncode is None, f"{self!r} exited at start:\n{self.log()}"

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self!r} still running after {timeout}s:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


class WorkerProcesses:
    """Starts worker processes that open the test database; ``kill_all`` ends every one."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(
        self,
        worker_id: str,
        *,
        lease_seconds: float = 3.0,
        grace_seconds: float = 10.0,
        concurrency: int = 4,
        queues: Sequence[str] = (),
        burst: bool = False,
        wait_started: bool = True,
        env_overrides: dict[str, str] | None = None,
    ) -> WorkerProcess:
        env = process_env(DS_LEASE_SECONDS=str(lease_seconds), DS_GRACE_SECONDS=str(grace_seconds))
        env.update(env_overrides or {})  # e.g. another database server
        args = ["--concurrency", str(concurrency)]
        for queue in queues:
            args += ["--queue", queue]
        if burst:
            args.append("--burst")
        worker = WorkerProcess(worker_id, args, env, self.log_dir / f"{worker_id}.log")
        self.started.append(worker)
        if wait_started:
            worker.wait_started()
        return worker

    def kill_all(self) -> None:
        for worker in self.started:
            worker.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {w!r}\n{w.log()}" for w in self.started)


@contextmanager
def worker_processes(log_dir: Path) -> Iterator[WorkerProcesses]:
    """Worker processes that are killed when the block ends, whatever happens in it."""
    processes = WorkerProcesses(log_dir)
    try:
        yield processes
    finally:
        processes.kill_all()
