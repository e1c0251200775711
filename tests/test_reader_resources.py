"""What an idle reader costs a real daphne process: no database connection, no thread.

Hundreds of signed-in readers each keep a stream open; the test counts the server's
connections to the test database (``pg_stat_activity``) and its threads
(``/proc/PID/status``), with few readers and with many.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
)
from django.contrib.sessions.backends.db import SessionStore
from django.db import connection

from durable_streams import start_workflow
from tests import workflows
from tests.servers import HOST, WebSocketClient
from tests.sockets import (
    READER_FIXTURES,
    make_user,
    session_cookie,
)
from tests.test_sse import get, url
from tests.waiting import wait_until, wait_until_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120), READER_FIXTURES]


def signed_in_sessions(username: str, count: int) -> tuple[Any, list[str]]:
    """A user and ``count`` session keys, each signed in as that user."""
    user = get_user_model().objects.create_user(username)
    keys = []
    for _ in range(count):
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        keys.append(session.session_key)
    return user, keys


def database_connections() -> int:
    """Connections to the test database, this test's own one left out."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [connection.settings_dict["NAME"]],
        )
        return int(cursor.fetchone()[0])


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no thread count for process {pid}")


class SseReader:
    """One raw HTTP connection reading a stream's events."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str, session_key: str) -> SseReader:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 20)
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {HOST}:{port}",
            "Accept: text/event-stream",
            f"Cookie: {settings.SESSION_COOKIE_NAME}={session_key}",
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        # The first chunk of the stream: the response is streaming from here on.
        await asyncio.wait_for(reader.readuntil(b"retry: 1000\n\n\r\n"), 30)
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.close()


async def silent(client: SseReader | WebSocketClient) -> bool:
    """Whether the reader is still open and hears nothing for a second."""
    try:
        if isinstance(client, SseReader):
            got: Any = await asyncio.wait_for(client.reader.read(1), 1.0)
        else:
            got = await client.receive(1.0)
    except TimeoutError:
        return True
    raise AssertionError(f"an idle reader got {got!r}")


@pytest.mark.postgres
async def test_idle_signed_in_readers_hold_no_connection_and_no_thread(
    daphne: Any,
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("counts connections in PostgreSQL's pg_stat_activity (DATABASE_URL)")
    few, many, sockets, batch = 10, 200, 50, 19
    user, keys = await sync_to_async(signed_in_sessions)("reader", many + sockets)
    # No worker runs here: the workflow stays enqueued and its stream open and idle.
    handle = await sync_to_async(start_workflow)(workflows.echo, owner=user)
    sse_path = f"/durable-streams/{handle.workflow_id}/out/events"
    ws_path = f"/ws/durable-streams/{handle.workflow_id}/out/"
    server = daphne()
    pid = server.process.pid
    readers: list[SseReader | WebSocketClient] = []
    # The default executor of the server's loop (ds_feed.run_db) may start a few more
    # threads under load: a bound shared by all readers, not one per reader.
    pool = min(32, (os.cpu_count() or 1) + 4)

    recent: list[tuple[int, int]] = []

    def steady(t: int, c: int) -> bool:
        recent.append((t, c))
        return len(recent) >= 5 and len(set(recent[-5:])) == 1

    def settled(bound: Any, what: str) -> tuple[int, int]:
        # A retired thread ends, and a closed connection leaves pg_stat_activity,
        # shortly after the response has started.
        seen: list[tuple[int, int]] = []

        def counts() -> tuple[int, int] | None:
            seen.append((threads(pid), database_connections()))
            return seen[-1] if bound(*seen[-1]) else None

        try:
            return wait_until(counts, timeout=15, interval=0.1)
        except AssertionError:
            raise AssertionError(
                f"with {what}: {seen[-1][0]} threads and {seen[-1][1]} database "
                f"connections, {baseline} with {few} readers"
            ) from None

    async def open_sse(count: int) -> None:
        first = len(readers)
        readers.extend(
            await asyncio.gather(
                *(SseReader.open(server.port, sse_path, keys[first + i]) for i in range(count))
            )
        )

    async def open_sockets(count: int) -> None:
        first = len(readers)
        cookies = [{"Cookie": f"sessionid={keys[first + i]}"} for i in range(count)]
        readers.extend(
            await asyncio.gather(
                *(WebSocketClient.connect(server.port, ws_path, headers=c) for c in cookies)
            )
        )

    baseline = (0, 0)
    try:
        await open_sse(few)
        # Steady: the same counts for half a second.
        baseline = await sync_to_async(settled)(steady, f"{few} readers")

        def flat(t: int, c: int) -> bool:
            return t <= baseline[0] + pool and c <= baseline[1] + 2

        # In steps: a server that keeps a connection per reader fails at the first one,
        # long before it could use up the shared server's connections.
        while len(readers) < many:
            await open_sse(min(batch, many - len(readers)))
            await sync_to_async(settled)(flat, f"{len(readers)} SSE readers")
        # Signed-in WebSocket readers of the same stream add none either.
        while len(readers) < many + sockets:
            await open_sockets(min(batch, many + sockets - len(readers)))
            await sync_to_async(settled)(
                flat, f"{many} SSE readers and {len(readers) - many} sockets"
            )
        # Every reader is still open, authorized, and waiting: the stream is idle.
        assert await asyncio.gather(*(silent(r) for r in readers)) == [True] * len(readers)
    finally:
        for reader in readers:
            reader.close()
    assert "Traceback" not in server.log(), server.log()


async def test_open_event_streams_in_this_process_keep_no_request_thread(
    async_db: None,
) -> None:
    # The same through the ASGI application in this process, on any database.
    owner = await make_user("in-process-reader")
    cookie = await session_cookie(owner)
    handle = await sync_to_async(start_workflow)(workflows.echo, owner=owner)
    responses = [await get(url(handle.workflow_id, "out"), [cookie]) for _ in range(3)]
    before = threading.active_count()
    responses += [await get(url(handle.workflow_id, "out"), [cookie]) for _ in range(30)]
    try:
        assert {r.status for r in responses} == {200}
        for response in responses:
            await response._more(10)
            assert response.text == "retry: 1000\n\n"
        # Each request ran its middleware in a thread of its own: all of those are gone.
        await wait_until_async(lambda: threading.active_count() <= before + 2)
    finally:
        for response in responses:
            await response.communicator.send_input({"type": "http.disconnect"})
            await response.communicator.wait(timeout=5)
