"""A MariaDB server killed (SIGKILL) and restarted under real worker processes.

The test runs a mariadbd of its own (tests/private_services.py); the shared server
of the test run is never touched.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.database_outage import outage_under_load
from tests.private_services import (
    PrivateMariaDB,
    django_env,
    private_mariadb,  # noqa: F401 - a fixture
)

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
    server = private_mariadb

    def crash() -> None:
        server.kill()
        time.sleep(2)  # the outage
        server.start()

    outage_under_load(
        django_env(server.url),
        tmp_path,
        interrupt=crash,
        statuses=lambda ids: statuses(server, ids),
        workers_named=("crash-a", "crash-b"),
        recovery_timeout=180,
    )
