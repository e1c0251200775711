"""A reader that never reads costs the server a bounded amount of memory.

Real ASGI server processes (daphne, and uvicorn when installed) serve a public
stream of 40,000 values of 1 kB; a raw client completes the WebSocket handshake (or
sends the SSE request) and then reads nothing. The server's resident memory, from
/proc/PID/status once the server has gone idle, must stay far below the size of the
stream: a window's worth of frames, not the whole stream.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from durable_streams import start_workflow
from tests.processes import process_env
from tests.servers import HOST, Daphne, Uvicorn, WebSocketClient
from tests.waiting import wait_until
from tests.workflows_readers import sized, value

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(120),
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc"),
]

COUNT = 40_000  # values of about 1 kB: 40 MB of frames
# Growth allowed over the warmed-up server: the window (1 MiB), a read batch (500 kB),
# allocator slack. Without flow control, daphne (WebSocket and SSE) and uvicorn (SSE)
# grew by 41 to 45 MiB here, a little more than the stream itself.
GROWTH_LIMIT_KIB = 16 * 1024


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def settled_rss(pid: int, quiet: float = 1.0, timeout: float = 30.0) -> int:
    """The RSS once the process has used (almost) no CPU for ``quiet`` seconds."""
    samples: list[tuple[float, int]] = []

    def idle() -> bool:
        now, ticks = time.monotonic(), cpu_ticks(pid)
        samples.append((now, ticks))
        before = [t for at, t in samples if now - at >= quiet]
        # At most 2 ticks (20 ms) of CPU: an idle server's own timers.
        return bool(before) and ticks - before[-1] <= 2

    wait_until(idle, timeout=timeout, interval=0.1, what=f"process {pid} to go idle")
    return rss_kib(pid)


SERVERS = ["daphne", "uvicorn"]


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    kind = request.param
    if kind == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
        pytest.skip("uvicorn is not installed (pip install 'durable-streams[test]')")
    # The in-memory layer: the stream is closed, readers only catch up from the database.
    env = process_env(REDIS_URL=None)
    started = (Daphne if kind == "daphne" else Uvicorn)(tmp_path / f"{kind}.log", env)
    try:
        yield started
    finally:
        started.stop()
    assert "Traceback" not in started.log(), started.log()


def connect(port: int) -> socket.socket:
    sock = socket.socket()
    # A small receive buffer (set before connecting, so that the window stays small):
    # the kernel holds little of what the server sends, and what the server keeps shows.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(10)
    sock.connect((HOST, port))
    return sock


def websocket_handshake(port: int, path: str) -> socket.socket:
    """A WebSocket opened over a blocking socket; the caller reads from it, or not."""
    sock = connect(port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: http://{HOST}:{port}\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        # One byte at a time: nothing past the handshake is read.
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    return sock


def sse_request(port: int, path: str) -> socket.socket:
    sock = connect(port)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
    return sock


def read_sse_to_end(port: int, path: str) -> str:
    sock = socket.create_connection((HOST, port), timeout=20)
    with sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


async def first_frames(sock: socket.socket, count: int) -> list[int]:
    reader, writer = await asyncio.open_connection(sock=sock)
    client = WebSocketClient(reader, writer)
    try:
        offsets = []
        for _ in range(count):
            frame = await client.receive(10)
            assert isinstance(frame, dict) and frame["type"] == "entry", frame
            assert frame["value"] == value(frame["offset"])
            offsets.append(frame["offset"])
        return offsets
    finally:
        client.close()


async def read_all_over_websocket(port: int, path: str) -> int:
    """Read a stream that fits in one window (READER_WINDOW_BYTES) to its close.

    It sends no ack: an ack that reaches the server after it closed the connection
    is answered with a reset, which discards what the client had still to read.
    """
    client = await WebSocketClient.connect(port, path)
    count = 0
    try:
        while True:
            frame = await client.receive(20)
            if isinstance(frame, tuple):
                assert frame[0] == 1000
                return count
            count += frame["type"] == "entry"
    finally:
        client.close()


@pytest.mark.parametrize("reader", ["websocket", "sse"])
def test_a_reader_that_never_reads_holds_bounded_server_memory(
    server: Any, reader: str, run_burst: Any
) -> None:
    small = start_workflow(sized, "out", 300, public=True)
    large = start_workflow(sized, "out", COUNT, public=True)
    run_burst()
    ws_path = "/ws/durable-streams/{}/out/"
    sse_path = "/durable-streams/{}/out/events"
    # Warm up: the small stream read whole both ways loads every code path first.
    assert (
        asyncio.run(read_all_over_websocket(server.port, ws_path.format(small.workflow_id))) == 300
    )
    assert '"type":"closed"' in read_sse_to_end(server.port, sse_path.format(small.workflow_id))
    baseline = settled_rss(server.process.pid)

    if reader == "websocket":
        sock = websocket_handshake(server.port, ws_path.format(large.workflow_id))
    else:
        sock = sse_request(server.port, sse_path.format(large.workflow_id))
    try:
        after = settled_rss(server.process.pid)
        growth = after - baseline
        assert growth < GROWTH_LIMIT_KIB, f"RSS {baseline} -> {after} KiB (+{growth})"
        if reader == "websocket":
            # Paused, not broken: the frames wait in order for the client.
            assert asyncio.run(first_frames(sock, 5)) == [0, 1, 2, 3, 4]
        else:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
