"""The stream as Server-Sent Events, through the test suite's real ASGI application."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator

from durable_streams.bus import layer as ds_layer
from tests.asgi import application
from tests.sockets import (
    READER_FIXTURES,
    make_user,
    open_gate,
    run_all,
    session_cookie,
    start,
)
from tests.stored import stream_length
from tests.waiting import wait_until_async
from tests.workflows_readers import gated, many

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]


class EventStream:
    """One SSE response read chunk by chunk, as a browser's EventSource would."""

    def __init__(self, communicator: ApplicationCommunicator) -> None:
        self.communicator = communicator
        self.status = 0
        self.headers: dict[str, str] = {}
        self.buffer = ""
        self.ended = False
        self.text = ""

    async def start(self) -> EventStream:
        message = await self.communicator.receive_output(timeout=10)
        assert message["type"] == "http.response.start"
        self.status = message["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        return self

    async def _more(self, timeout: float) -> None:
        message = await self.communicator.receive_output(timeout=timeout)
        assert message["type"] == "http.response.body"
        chunk = message.get("body", b"").decode()
        self.buffer += chunk
        self.text += chunk
        if not message.get("more_body", False):
            self.ended = True

    async def event(self, timeout: float = 10.0) -> dict[str, str]:
        """The next event with data (comments and retry lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            while "\n\n" in self.buffer:
                block, self.buffer = self.buffer.split("\n\n", 1)
                fields: dict[str, str] = {}
                for line in block.split("\n"):
                    if line.startswith(":"):
                        continue
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                if "data" in fields:
                    return fields
            assert not self.ended, f"the response ended; got {self.text!r}"
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no event within {timeout}s; got {self.text!r}"
            await self._more(remaining)

    async def until_closed(self, timeout: float = 20.0) -> list[dict[str, str]]:
        events = []
        while True:
            event = await self.event(timeout)
            events.append(event)
            if event.get("event") == "closed":
                while not self.ended:
                    await self._more(timeout)
                return events

    async def body(self) -> str:
        while not self.ended:
            await self._more(10)
        return self.text


async def get(
    url: str, headers: list[tuple[bytes, bytes]] | None = None, method: str = "GET"
) -> EventStream:
    path, _, query = url.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    return await EventStream(communicator).start()


def url(workflow_id: str, key: str, query: str = "") -> str:
    return f"/durable-streams/{workflow_id}/{key}/events" + (f"?{query}" if query else "")


def decoded(events: list[dict[str, str]]) -> list[Any]:
    return [json.loads(e["data"]) for e in events]


async def test_closed_stream_is_sent_whole_then_the_response_ends(run_burst: Any) -> None:
    wid = await start(many, "out", 3)
    await run_all(run_burst)
    response = await get(url(wid, "out"))
    assert response.status == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    events = await response.until_closed()
    assert [(e.get("id"), e["event"]) for e in events] == [
        ("0", "entry"),
        ("1", "entry"),
        ("2", "entry"),
        (None, "closed"),
    ]
    assert decoded(events) == [
        {"type": "entry", "key": "out", "offset": i, "value": {"i": i, "text": f"value {i}"}}
        for i in range(3)
    ] + [{"type": "closed", "key": "out", "length": 3}]
    assert response.text.startswith("retry: 1000\n\n")
    await response.communicator.wait(timeout=5)


async def test_last_event_id_resumes_after_that_offset(run_burst: Any) -> None:
    wid = await start(many, "out", 5)
    await run_all(run_burst)
    response = await get(url(wid, "out", "offset=0"), [(b"last-event-id", b"2")])
    events = await response.until_closed()
    assert [e.get("id") for e in events] == ["3", "4", None]


async def test_offset_query_starts_there(run_burst: Any) -> None:
    wid = await start(many, "out", 5)
    await run_all(run_burst)
    events = await (await get(url(wid, "out", "offset=4"))).until_closed()
    assert decoded(events)[0]["offset"] == 4 and len(events) == 2


async def test_live_values_follow_the_backlog(live_worker: Any) -> None:
    wid = await start(gated, "out", ["a", "b"], ["c", "d"], "gate-sse")
    await wait_until_async(lambda: stream_length(wid, "out") == 2)
    response = await get(url(wid, "out"))
    first = [await response.event(), await response.event()]
    assert [json.loads(e["data"])["value"] for e in first] == ["a", "b"]
    await open_gate("gate-sse")
    rest = await response.until_closed()
    assert decoded(rest) == [
        {"type": "entry", "key": "out", "offset": 2, "value": "c"},
        {"type": "entry", "key": "out", "offset": 3, "value": "d"},
        {"type": "closed", "key": "out", "length": 4},
    ]


async def test_a_quiet_response_gets_keep_alives_at_the_heartbeat_interval(
    live_worker: Any, settings: Any
) -> None:
    interval = 0.4
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "READER_HEARTBEAT_SECONDS": interval}
    wid = await start(gated, "out", ["a"], ["b"], "gate-sse-keepalive")
    await wait_until_async(lambda: stream_length(wid, "out") == 1)
    response = await get(url(wid, "out"))
    assert json.loads((await response.event())["data"])["value"] == "a"
    heard = [time.monotonic()]
    while len(heard) < 4:
        # Long before the old fixed 15 s: the comment follows the setting.
        await response._more(timeout=10)
        if response.buffer.endswith(": keep-alive\n\n"):
            response.buffer = ""
            heard.append(time.monotonic())
    gaps = [later - earlier for earlier, later in zip(heard, heard[1:], strict=False)]
    assert all(gap >= interval * 0.9 for gap in gaps), gaps
    await open_gate("gate-sse-keepalive")
    rest = await response.until_closed()
    assert decoded(rest)[-1] == {"type": "closed", "key": "out", "length": 2}


async def test_disconnect_mid_stream_releases_the_subscription(live_worker: Any) -> None:
    wid = await start(gated, "out", ["a"], ["b"], "gate-sse-disconnect")
    await wait_until_async(lambda: stream_length(wid, "out") == 1)
    response = await get(url(wid, "out"))
    assert json.loads((await response.event())["data"])["value"] == "a"
    assert ds_layer.loops.current()  # the open response listens on this loop
    await response.communicator.send_input({"type": "http.disconnect"})
    await response.communicator.wait(timeout=5)
    assert ds_layer.loops.current() == []
    await open_gate("gate-sse-disconnect")


@pytest.mark.parametrize(
    ("query", "headers", "fragment"),
    [
        ("offset=-1", [], "offset must be a whole number"),
        ("offset=x", [], "offset must be a whole number"),
        ("", [(b"last-event-id", b"two")], "Last-Event-ID must be a whole number"),
        ("offset=1&offset=2", [], "Give offset once."),
        ("offset=0&offset=0", [], "Give offset once."),
    ],
)
async def test_bad_offsets_are_400(
    run_burst: Any, query: str, headers: list[tuple[bytes, bytes]], fragment: str
) -> None:
    wid = await start(many, "out", 1)
    response = await get(url(wid, "out", query), headers)
    assert response.status == 400
    assert fragment in await response.body()


@pytest.mark.parametrize("workflow_id", ["a\x00", "\x00b"])
async def test_a_workflow_id_with_nul_is_400(db: None, workflow_id: str) -> None:
    # On PostgreSQL the NUL reached the query and failed it: HTTP 500.
    response = await get(url(workflow_id, "out"))
    assert response.status == 400
    assert "NUL" in await response.body()


async def test_unknown_workflow_is_404_and_head_is_405(db: None) -> None:
    response = await get(url("nope", "out"))
    assert response.status == 404
    assert "No such workflow" in await response.body()
    assert (await get(url("nope", "out"), method="HEAD")).status == 405


async def test_private_stream_needs_the_owner(run_burst: Any) -> None:
    owner = await make_user("sse-owner")
    stranger = await make_user("sse-stranger")
    handle = await sync_to_async(many.using(owner=owner).start)("out", 2)
    await run_all(run_burst)
    target = url(handle.workflow_id, "out")
    missing = await (await get(url("nope", "out"))).body()
    for headers in ([], [await session_cookie(stranger)]):
        refused = await get(target, headers)
        # The answer for a missing workflow, word for word: ids cannot be probed.
        assert (refused.status, await refused.body()) == (404, missing)
    events = await (await get(target, [await session_cookie(owner)])).until_closed()
    assert len(events) == 3
