"""Streams across real processes: a ``runworkers`` process writes, a daphne process serves,
and this test reads over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from durable_streams import start_workflow
from durable_streams.models import StreamEntry
from tests import workflows
from tests.processes import ROOT, worker_processes
from tests.servers import HOST, WebSocketClient

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(180),
    pytest.mark.usefixtures("close_thread_connections"),
]


async def read_stream_over_socket(
    port: int, path: str, timeout: float, on_value: Any = None
) -> tuple[list[tuple[int, Any, float]], dict[str, Any], int]:
    """(offset, value, arrival time) of each entry, the closed frame, and the close code."""
    client = await WebSocketClient.connect(port, path)
    received: list[tuple[int, Any, float]] = []
    deadline = time.monotonic() + timeout
    closed: dict[str, Any] = {}
    try:
        while True:
            frame = await client.receive(deadline - time.monotonic())
            if isinstance(frame, tuple):
                return received, closed, frame[0]
            if frame["type"] == "entry":
                received.append((frame["offset"], frame["value"], time.time()))
                if on_value is not None:
                    await on_value(len(received))
            else:
                closed = frame
    finally:
        client.close()


async def http_get(port: int, path: str, headers: dict[str, str], timeout: float = 20.0) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    try:
        return (await asyncio.wait_for(reader.read(), timeout)).decode()
    finally:
        writer.close()


def entry_times(workflow_id: str) -> dict[int, float]:
    rows = StreamEntry.objects.filter(stream__workflow_id=workflow_id, stream__key="out")
    return {offset: at.timestamp() for offset, at in rows.values_list("offset", "created_at")}


@pytest.mark.postgres
@pytest.mark.redis
async def test_push_through_redis_and_a_worker_killed_mid_stream(
    tmp_path: Path, daphne: Any
) -> None:
    if connection.vendor == "sqlite" or not os.environ.get("REDIS_URL"):
        pytest.skip("needs a database server (DATABASE_URL) and Redis (REDIS_URL)")
    count = 40
    server = daphne()
    with worker_processes(tmp_path) as workers:
        first = await sync_to_async(workers.start)("worker-a", lease_seconds=3.0)
        handle = await sync_to_async(start_workflow)(workflows.steady, count, 0.08, public=True)
        killed_at: list[float] = []

        async def kill_after_ten(received: int) -> None:
            if received == 10:
                first.kill()
                killed_at.append(time.time())
                await sync_to_async(workers.start)("worker-b", lease_seconds=3.0)

        received, closed, code = await read_stream_over_socket(
            server.port, f"/ws/durable-streams/{handle.workflow_id}/out/", 90, kill_after_ten
        )
        assert [(offset, value) for offset, value, _ in received] == [
            (i, i) for i in range(count)
        ], workers.logs()
        assert closed == {"type": "closed", "key": "out", "length": count}
        assert code == 1000
        assert await sync_to_async(handle.result)(timeout=30) == count

        # Pushed, not polled: values written while a worker was alive arrived at once.
        written = await sync_to_async(entry_times)(handle.workflow_id)
        lags = sorted(
            at - written[offset] for offset, _, at in received if written[offset] < killed_at[0]
        )
        assert lags[len(lags) // 2] < 0.25, (lags, server.log())

        # The same stream over Server-Sent Events, resumed after offset 35.
        body = await http_get(
            server.port,
            f"/durable-streams/{handle.workflow_id}/out/events",
            {"Last-Event-ID": "35"},
        )
        assert "200 OK" in body.split("\r\n", 1)[0]
        ids = re.findall(r"^id: (\d+)$", body, re.M)
        assert ids == ["36", "37", "38", "39"]
        assert '"type":"closed","key":"out","length":40' in body


async def test_in_memory_layer_and_a_separate_worker_process_poll(
    tmp_path: Path, daphne: Any
) -> None:
    # Neither process can reach the other's in-memory layer: the socket polls the database.
    # The demo's default setup; its worker is killed mid-stream and another one finishes.
    server = daphne(REDIS_URL=None)
    count = 25
    with worker_processes(tmp_path) as workers:
        saved = os.environ.pop("REDIS_URL", None)
        try:
            first = await sync_to_async(workers.start)("worker-memory-a", lease_seconds=2.0)
            handle = await sync_to_async(start_workflow)(workflows.steady, count, 0.05, public=True)

            async def kill_after_eight(received: int) -> None:
                if received == 8:
                    first.kill()
                    await sync_to_async(workers.start)("worker-memory-b", lease_seconds=2.0)

            received, closed, code = await read_stream_over_socket(
                server.port, f"/ws/durable-streams/{handle.workflow_id}/out/", 60, kill_after_eight
            )
        finally:
            if saved is not None:
                os.environ["REDIS_URL"] = saved
        assert [(offset, value) for offset, value, _ in received] == [
            (i, i) for i in range(count)
        ], workers.logs()
        assert closed == {"type": "closed", "key": "out", "length": count}
        assert code == 1000


def test_the_demo_command_refuses_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
        result = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), "demo", "--port", str(port)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"Port {port} on 127.0.0.1 is in use; pick another with --port." in result.stderr


async def test_refusals_and_origin_over_a_real_socket(daphne: Any) -> None:
    server = daphne()
    handle = await sync_to_async(start_workflow)(workflows.echo, 1)
    client = await WebSocketClient.connect(
        server.port, f"/ws/durable-streams/{handle.workflow_id}/out/"
    )
    # Daphne sends the code but not the reason text: clients go by the code. A private
    # workflow is answered like a missing one.
    assert (await client.receive(10))[0] == 4404
    client = await WebSocketClient.connect(server.port, "/ws/durable-streams/missing/out/")
    assert (await client.receive(10))[0] == 4404
    client = await WebSocketClient.connect(
        server.port, f"/ws/durable-streams/{handle.workflow_id}/out/?offset=-3"
    )
    assert (await client.receive(10))[0] == 4400
    with pytest.raises(ConnectionRefusedError, match="403"):
        await WebSocketClient.connect(
            server.port, "/ws/durable-streams/missing/out/", origin="http://evil.example"
        )
    assert "Traceback" not in server.log()
