"""Streams across real processes: a ``runworkers`` process writes, a daphne process serves,
and this test reads over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections

from durable_streams import start_workflow
from durable_streams.models import StreamEntry
from tests import workflows
from tests.processes import ROOT, wait_until, worker_processes

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
async def _close_thread_connections() -> AsyncIterator[None]:
    # sync_to_async() runs the test's database calls in a thread of its own: close its
    # connection, or PostgreSQL refuses to drop the test database at the end.
    yield
    await sync_to_async(connections.close_all)()
    gc.collect()


HOST = "127.0.0.1"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketClient:
    """Just enough of RFC 6455 to read a stream: text frames, ping, close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str,
        origin: str | None = None,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
    ) -> WebSocketClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {HOST}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Origin: {origin or f'http://{HOST}:{port}'}",
        ]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)).decode("latin-1")
        if " 101 " not in head.split("\r\n", 1)[0]:
            writer.close()
            raise ConnectionRefusedError(head.split("\r\n", 1)[0])
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        fields = dict(
            line.split(": ", 1) for line in head.strip().split("\r\n")[1:] if ": " in line
        )
        assert {k.lower(): v for k, v in fields.items()}["sec-websocket-accept"] == accept
        return cls(reader, writer)

    async def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def _frame(self) -> tuple[bool, int, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return bool(first & 0x80), first & 0x0F, await self.reader.readexactly(length)

    async def receive(self, timeout: float) -> dict[str, Any] | tuple[int, str]:
        """The next JSON frame, or (code, reason) once the server closes."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no frame within {timeout}s")
            fin, opcode, payload = await asyncio.wait_for(self._frame(), remaining)
            if opcode == 0x9:
                await self._send(0xA, payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                await self._send(0x8, payload[:2])
                self.writer.close()
                return code, payload[2:].decode()
            elif opcode in (0x1, 0x0):
                parts.append(payload)
                if fin:
                    return json.loads(b"".join(parts).decode())

    def close(self) -> None:
        self.writer.close()


class Daphne:
    """``daphne tests.asgi:application`` on a port the OS picks; output in a log file."""

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", HOST, "-p", "0", "tests.asgi:application"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        found = wait_until(
            lambda: (
                self.process.poll() is not None
                or re.search(r"Listening on TCP address 127\.0\.0\.1:(\d+)", self.log())
            ),
            timeout=30,
            interval=0.05,
            what="daphne to listen",
        )
        assert self.process.poll() is None, f"daphne exited:\n{self.log()}"
        self.port = int(found.group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def process_env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        DS_TEST_DB_NAME=str(connection.settings_dict["NAME"]),
    )
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@pytest.fixture
def daphne(tmp_path: Path) -> Iterator[Any]:
    started: list[Daphne] = []

    def start(**env_changes: str | None) -> Daphne:
        server = Daphne(tmp_path / f"daphne-{len(started)}.log", process_env(**env_changes))
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


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
