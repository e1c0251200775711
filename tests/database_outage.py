"""A database server that goes away under real worker processes and comes back.

The scenario that the server fault tests share: streaming workflows run on two
worker processes while a follower process reads their streams and waits for their
results; mid-run the test interrupts the server (a restart, a SIGKILL). Every run
must end in SUCCESS with every value read once, in order, and the outage must have
cost attempts (replays), not runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.processes import ROOT, worker_processes
from tests.waiting import wait_until

WORKFLOWS, VALUES, DELAY = 8, 40, 0.05


class Follower:
    """``tests.fault_client follow``: reads streams and waits for results in a process."""

    def __init__(self, ids: list[str], env: dict[str, str], log: Path) -> None:
        self.out = log.open("w")
        self.path = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_client", "follow", *ids],
            cwd=ROOT,
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[list[Any]]:
        found = []
        for line in self.path.read_text().splitlines():
            if line.startswith("["):
                found.append(json.loads(line))
        return found

    def values(self) -> int:
        return sum(1 for line in self.lines() if line[0] == "value")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.out.close()


def outage_under_load(
    env: dict[str, str],
    logs: Path,
    *,
    interrupt: Callable[[], None],
    statuses: Callable[[list[str]], dict[str, tuple[str, int]]],
    workers_named: tuple[str, str],
    recovery_timeout: float,
) -> None:
    """Run the scenario against the database of ``env``; ``interrupt`` takes the server
    away and brings it back; ``statuses`` reads (status, attempts) of the runs from it."""
    started = subprocess.run(
        [sys.executable, "-m", "tests.fault_client", "start", "restart", str(WORKFLOWS),
         str(VALUES), str(DELAY)],  # fmt: skip
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    ids = started.stdout.split()
    assert len(ids) == WORKFLOWS
    overrides = {k: env[k] for k in ("DATABASE_URL", "DS_TEST_DB_NAME", "REDIS_URL")}
    follower = Follower(ids, env, logs / "follower.log")
    try:
        with worker_processes(logs) as workers:
            for name in workers_named:
                workers.start(name, concurrency=4, lease_seconds=3, env_overrides=overrides)
            # Mid-run: some values are out, most are still to come.
            wait_until(
                lambda: follower.values() >= WORKFLOWS * VALUES // 4,
                timeout=60,
                what="a quarter of the values",
            )
            before = follower.values()
            interrupt()
            wait_until(
                lambda: follower.process.poll() is not None,
                timeout=recovery_timeout,
                what="the follower to read every stream to its end",
            )
            worker_logs = workers.logs()
        lines = follower.lines()
    finally:
        follower.stop()
    assert before < WORKFLOWS * VALUES, "the outage came after the end"
    errors = [line for line in lines if line[0] == "error"]
    assert not errors, errors
    for wid in ids:
        got = [line[2] for line in lines if line[0] == "value" and line[1] == wid]
        label = got[0][0] if got else None
        assert got == [[label, i] for i in range(VALUES)], (wid, got)
        assert ["result", wid, VALUES] in lines, wid
    ended = statuses(ids)
    assert {status for status, _ in ended.values()} == {"SUCCESS"}, ended
    assert any(attempts > 1 for _, attempts in ended.values()), (ended, worker_logs[-3000:])
