"""A MariaDB server killed (SIGKILL) and restarted under real worker processes.

The test runs a mariadbd of its own (tests/private_services.py); the shared server
of the test run is never touched.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.private_services import (
    PrivateMariaDB,
    django_env,
    private_mariadb,  # noqa: F401 - a fixture
)
from tests.processes import ROOT, wait_until, worker_processes
from tests.test_fault_processes import DELAY, VALUES, WORKFLOWS, Follower

pytestmark = pytest.mark.timeout(300)


def statuses(server: PrivateMariaDB, ids: list[str]) -> dict[str, tuple[str, int]]:
    listed = ", ".join(f"'{pk}'" for pk in ids)  # uuids from the start command
    rows = server.sql(
        f"SELECT id, status, attempts FROM ds_faults.durable_streams_workflow "
        f"WHERE id IN ({listed})"
    )
    found = {}
    for line in rows.splitlines():
        pk, status, attempts = line.split("\t")
        found[pk] = (status, int(attempts))
    return found


def test_a_mariadb_crash_under_load_ends_every_workflow_and_loses_no_value(
    private_mariadb: PrivateMariaDB,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    server, logs = private_mariadb, tmp_path
    env = django_env(server.url)
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
            for name in ("crash-a", "crash-b"):
                workers.start(name, concurrency=4, lease_seconds=3, env_overrides=overrides)
            # Mid-run: some values are out, most are still to come.
            wait_until(
                lambda: follower.values() >= WORKFLOWS * VALUES // 4,
                timeout=60,
                what="a quarter of the values",
            )
            before = follower.values()
            server.kill()
            time.sleep(2)  # the outage
            server.start()
            wait_until(
                lambda: follower.process.poll() is not None,
                timeout=180,
                what="the follower to read every stream to its end",
            )
            worker_logs = workers.logs()
        lines = follower.lines()
    finally:
        follower.stop()
    assert before < WORKFLOWS * VALUES, "the crash came after the end"
    errors = [line for line in lines if line[0] == "error"]
    assert not errors, errors
    for wid in ids:
        got = [line[2] for line in lines if line[0] == "value" and line[1] == wid]
        label = got[0][0] if got else None
        assert got == [[label, i] for i in range(VALUES)], (wid, got)
        assert ["result", wid, VALUES] in lines, wid
    ended = statuses(server, ids)
    assert {status for status, _ in ended.values()} == {"SUCCESS"}, ended
    # The crash cost attempts (replays), not runs.
    assert any(attempts > 1 for _, attempts in ended.values()), (ended, worker_logs[-3000:])
