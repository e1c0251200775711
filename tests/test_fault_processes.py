"""Faults of the servers under real processes: a PostgreSQL restart, a Redis outage.

Each test runs its own servers (tests/private_services.py) and stops or restarts
them mid-run; the shared servers of the test run are never touched.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.database_outage import outage_under_load
from tests.private_services import (
    PrivatePostgres,
    PrivateRedis,
    django_env,
    private_postgres,  # noqa: F401 - a fixture
    private_redis,  # noqa: F401 - a fixture
)
from tests.processes import worker_processes

# The cluster is driven through psycopg (the "postgres" extra).
psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.timeout(240)


def statuses(cluster: PrivatePostgres, ids: list[str]) -> dict[str, tuple[str, int]]:
    with psycopg.connect(cluster.url.replace("postgres://", "postgresql://")) as conn:
        rows = conn.execute(
            "SELECT id, status, attempts FROM durable_streams_workflow WHERE id = ANY(%s)", [ids]
        ).fetchall()
    return {pk: (status, attempts) for pk, status, attempts in rows}


def test_a_postgresql_restart_under_load_ends_every_workflow_and_loses_no_value(
    private_postgres: PrivatePostgres,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    cluster = private_postgres

    def restart() -> None:
        cluster.stop()
        time.sleep(2)  # the outage
        cluster.start()

    outage_under_load(
        django_env(cluster.url),
        tmp_path,
        interrupt=restart,
        statuses=lambda ids: statuses(cluster, ids),
        workers_named=("restart-a", "restart-b"),
        recovery_timeout=120,
    )


# A Redis outage under WebSocket readers


@pytest.mark.django_db(transaction=True)
async def test_a_redis_outage_under_websocket_readers_polls_then_pushes_again(
    private_redis: PrivateRedis,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    from asgiref.sync import sync_to_async
    from django.db import connections

    from durable_streams import start_workflow
    from tests import workflows
    from tests.processes import process_env
    from tests.servers import Daphne, WebSocketClient

    poll = 0.5  # the daphne process's POLL_INTERVAL: slow enough to tell polls from pushes
    env = process_env(REDIS_URL=private_redis.url, DS_POLL_INTERVAL=str(poll))
    server = Daphne(tmp_path / "daphne.log", env)
    count, delay, readers = 70, 0.1, 3
    phases: dict[str, float] = {}
    try:
        with worker_processes(tmp_path) as workers:
            await sync_to_async(workers.start)(
                "outage-worker", env_overrides={"REDIS_URL": private_redis.url}
            )
            handle = await sync_to_async(start_workflow)(
                workflows.steady, count, delay, public=True
            )
            path = f"/ws/durable-streams/{handle.workflow_id}/out/"
            clients = [await WebSocketClient.connect(server.port, path) for _ in range(readers)]

            async def outage() -> None:
                # Let values be pushed first, then break Redis for 3 s, then bring it back.
                await asyncio.sleep(1.5)
                phases["down"] = time.time()
                await sync_to_async(private_redis.stop)()
                await asyncio.sleep(3.0)
                await sync_to_async(private_redis.start)()
                phases["up"] = time.time()

            results = await asyncio.gather(
                outage(), *(receive_all(client, 60) for client in clients)
            )
            worker_log = workers.logs()
        await sync_to_async(connections.close_all)()
        written = await sync_to_async(entry_times)(handle.workflow_id)
    finally:
        server.stop()
    log = server.log()
    assert "never retrieved" not in log, log
    for received, code in results[1:]:
        assert [(offset, value) for offset, value, _ in received] == [
            (i, i) for i in range(count)
        ], (worker_log[-2000:], log[-2000:])
        assert code == 1000
        lags = {offset: at - written[offset] for offset, _, at in received}
        down, up = phases["down"], phases["up"]
        # During the outage (after the first second of it, the redis client's own
        # retries), every value came within about one POLL_INTERVAL.
        during = sorted(lag for o, lag in lags.items() if down + 1.0 < written[o] < up)
        assert during and during[-1] < poll + 0.6, (during, log[-3000:])
        # Two seconds after Redis is back, values are pushed again, not polled.
        after = sorted(lag for o, lag in lags.items() if written[o] > up + 2.0)
        assert len(after) >= 5, (after, lags)
        assert after[len(after) // 2] < poll / 3, (after, log[-3000:])


def entry_times(workflow_id: str) -> dict[int, float]:
    from durable_streams.models import StreamEntry

    rows = StreamEntry.objects.filter(stream__workflow_id=workflow_id, stream__key="out")
    return {offset: at.timestamp() for offset, at in rows.values_list("offset", "created_at")}


async def receive_all(client: Any, timeout: float) -> tuple[list[tuple[int, Any, float]], int]:
    """(offset, value, arrival time) of each entry, and the close code."""
    received: list[tuple[int, Any, float]] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            frame = await client.receive(deadline - time.monotonic())
            if isinstance(frame, tuple):
                return received, frame[0]
            if frame["type"] == "entry":
                received.append((frame["offset"], frame["value"], time.time()))
    finally:
        client.close()
