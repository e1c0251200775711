"""Bounded memory per reader: the WebSocket window and its acks, the SSE budget, WSGI."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client

from durable_streams import start_workflow
from durable_streams.bus import layer as ds_layer
from durable_streams.web import feed as ds_feed
from durable_streams.web import protocol as ds_protocol
from durable_streams.web.views import _event_stream
from tests.sockets import (
    READER_FIXTURES,
    open_socket,
    path,
    read_until_closed,
    record_reads,
    run_all,
    start,
)
from tests.test_sse import get, url
from tests.workflows_readers import sized, value

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]


def frame_size(offset: int) -> int:
    return len(ds_protocol.entry_frame("out", offset, json.dumps(value(offset))))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The offset of every database read of a stream's values, as it happens."""
    return record_reads(monkeypatch)


@pytest.fixture
def small_window(settings: Any) -> int:
    """A 20 kB window, batches of 10 values of about 1 kB: a batch is half a window."""
    window = 20_000
    settings.DURABLE_STREAMS = {
        **settings.DURABLE_STREAMS,
        "READER_WINDOW_BYTES": window,
        "READ_BATCH_SIZE": 10,
    }
    return window


async def receive_entries(communicator: WebsocketCommunicator, count: int) -> list[int]:
    offsets = []
    for _ in range(count):
        frame = await communicator.receive_json_from(timeout=10)
        assert frame["type"] == "entry", frame
        assert frame["value"] == value(frame["offset"])
        offsets.append(frame["offset"])
    return offsets


async def ack(communicator: WebsocketCommunicator, offset: int) -> None:
    await communicator.send_to(text_data=json.dumps({"type": "ack", "offset": offset}))


def frames_to_fill(window: int, first: int = 0, unacked: int = 0) -> int:
    """How many frames from ``first`` the server sends before ``unacked`` bytes fill it."""
    count = 0
    while unacked < window:
        unacked += frame_size(first + count)
        count += 1
    return count


# The WebSocket window


async def test_a_client_that_never_acks_gets_one_window_and_the_feed_stops_reading(
    run_burst: Any, small_window: int, reads: list[int]
) -> None:
    wid = await start(sized, "out", 200)
    await run_all(run_burst)
    communicator = await open_socket(path(wid, "out"))
    first = frames_to_fill(small_window)
    assert first == 20
    assert await receive_entries(communicator, first) == list(range(first))
    # Paused: nothing more is sent, and the stream is not read any further.
    assert await communicator.receive_nothing(timeout=0.5)
    assert reads == [0, 10], reads
    await communicator.disconnect()


async def test_acks_resume_the_reader_by_what_they_free(
    run_burst: Any, small_window: int, reads: list[int]
) -> None:
    wid = await start(sized, "out", 200)
    await run_all(run_burst)
    communicator = await open_socket(path(wid, "out"))
    assert await receive_entries(communicator, 20) == list(range(20))
    assert await communicator.receive_nothing(timeout=0.3)
    # Acknowledging the first 10 frees 10 frames' worth of room: 10 more come.
    await ack(communicator, 10)
    assert await receive_entries(communicator, 10) == list(range(20, 30))
    assert await communicator.receive_nothing(timeout=0.3)
    assert reads == [0, 10, 20]
    # An ack that frees nothing new changes nothing.
    await ack(communicator, 5)
    assert await communicator.receive_nothing(timeout=0.3)
    await ack(communicator, 30)
    assert await receive_entries(communicator, 20) == list(range(30, 50))
    assert await communicator.receive_nothing(timeout=0.3)
    assert reads == [0, 10, 20, 30, 40]
    await communicator.disconnect()


async def test_a_client_that_acks_gets_every_value_once_in_order(
    run_burst: Any, small_window: int
) -> None:
    count = 300
    wid = await start(sized, "out", count)
    await run_all(run_burst)
    communicator = await open_socket(path(wid, "out", "offset=3"))
    received: list[int] = []
    while True:
        frame = await communicator.receive_json_from(timeout=10)
        if frame["type"] == "closed":
            break
        assert frame["value"] == value(frame["offset"])
        received.append(frame["offset"])
        if len(received) % 4 == 0:  # acks for the next offset needed, every 4 frames
            await ack(communicator, frame["offset"] + 1)
    assert received == list(range(3, count))
    assert frame == {"type": "closed", "key": "out", "length": count}
    assert (await communicator.receive_output(timeout=10))["code"] == 1000


async def test_a_full_window_without_acks_is_closed_4408(
    run_burst: Any, small_window: int, settings: Any
) -> None:
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "READER_STALL_SECONDS": 1.0}
    wid = await start(sized, "out", 100)
    await run_all(run_burst)
    communicator = await open_socket(path(wid, "out"))
    assert await receive_entries(communicator, 20) == list(range(20))
    full_at = time.monotonic()
    # Some acks that free nothing are signs of life: the stall starts over at each.
    for _ in range(3):
        await ack(communicator, 0)
        assert await communicator.receive_nothing(timeout=0.3)
    message = await communicator.receive_output(timeout=10)
    assert message["type"] == "websocket.close"
    assert message["code"] == 4408
    assert "reconnect" in message["reason"]
    assert time.monotonic() - full_at >= 0.6 + 1.0
    # The client comes back from the offset it needs, and goes on.
    frames, code = await read_until_closed(await open_socket(path(wid, "out", "offset=90")))
    assert [f["offset"] for f in frames if f["type"] == "entry"] == list(range(90, 100))
    assert code == 1000


@pytest.mark.parametrize(
    "junk",
    [
        "not json",
        "[1, 2]",
        '{"type": "ack"}',
        '{"type": "ack", "offset": "30"}',
        '{"type": "ack", "offset": -1}',
        '{"type": "ack", "offset": true}',
        '{"type": "ack", "offset": 1.5e300}',
        '{"type": "nack", "offset": 30}',
        '{"type": "ack", "offset": 30, "padding": "' + "x" * 300 + '"}',
        "[" * 200 + "]" * 200,
        b"\x00\x01binary",
    ],
)
async def test_malformed_client_frames_are_ignored(
    run_burst: Any, small_window: int, junk: str | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="durable_streams")
    wid = await start(sized, "out", 60)
    await run_all(run_burst)
    communicator = await open_socket(path(wid, "out"))
    assert await receive_entries(communicator, 20) == list(range(20))
    if isinstance(junk, bytes):
        await communicator.send_to(bytes_data=junk)
    else:
        await communicator.send_to(text_data=junk)
    assert await communicator.receive_nothing(timeout=0.3)  # freed nothing, broke nothing
    await ack(communicator, 20)
    assert await receive_entries(communicator, 20) == list(range(20, 40))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    await communicator.disconnect()


async def test_a_feed_that_is_not_pulled_keeps_a_bounded_backlog_of_messages(
    run_burst: Any,
) -> None:
    # A reader paused by its window still hears every message of a live stream.
    count = 300
    wid = await start(sized, "out", count)
    await run_all(run_burst)
    feed = ds_feed.StreamFeed(wid, "out", 0)
    for offset in range(count):
        message = {"type": ds_layer.ENTRIES, "workflow": wid, "key": "out"}
        feed.notify({**message, "offset": offset, "count": 1, "values": None})
    feed.notify({"type": ds_layer.CLOSED, "workflow": wid, "key": "out", "length": count})
    assert len(feed._notes) <= ds_feed.MAX_NOTES + 1 < count
    # What it dropped it reads from the database: every value once, in order, then the end.
    events = []
    async with asyncio.timeout(20):
        async for event in feed.events():
            events.append(event)
    assert [e.offset for e in events[:-1]] == list(range(count))  # type: ignore[union-attr]
    assert events[-1] == ds_feed.Closed(count)


# Server-Sent Events: one window per response


def sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, rest = line.partition(":")
                fields[name] = rest.removeprefix(" ")
        if "data" in fields:
            events.append(fields)
    return events


async def test_an_sse_response_ends_after_its_budget_and_the_reconnect_resumes(
    run_burst: Any, settings: Any
) -> None:
    budget = 5_000
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "READER_WINDOW_BYTES": budget}
    count = 30
    wid = await start(sized, "out", count)
    await run_all(run_burst)
    offsets: list[int] = []
    headers: list[tuple[bytes, bytes]] = []
    responses = 0
    while True:
        response = await get(url(wid, "out"), headers)
        assert response.status == 200
        body = await response.body()
        responses += 1
        events = sse_events(body)
        entries = [e for e in events if e["event"] == "entry"]
        sizes = [len(f"id: {e['id']}\nevent: entry\ndata: {e['data']}\n\n") for e in entries]
        # At most the budget, plus the one event that crossed it.
        assert sum(sizes[:-1]) < budget, sizes
        for entry in entries:
            frame = json.loads(entry["data"])
            assert int(entry["id"]) == frame["offset"]
            assert frame["value"] == value(frame["offset"])
            offsets.append(frame["offset"])
        if events[-1]["event"] == "closed":
            assert json.loads(events[-1]["data"])["length"] == count
            break
        # Ended early, with a prompt reconnection asked for, as EventSource does it.
        assert sum(sizes) >= budget
        assert body.endswith("retry: 100\n\n"), body[-200:]
        headers = [(b"last-event-id", entries[-1]["id"].encode())]
        assert responses < 20
    assert offsets == list(range(count))
    assert responses == 7  # five events of about 1 kB fill 5,000 bytes


async def test_the_sse_feed_is_pulled_only_as_fast_as_the_response_is_read(
    run_burst: Any, small_window: int, reads: list[int]
) -> None:
    wid = await start(sized, "out", 200)
    await run_all(run_burst)
    stream = _event_stream(ds_feed.StreamFeed(wid, "out", 0))
    try:
        assert (await anext(stream)).startswith(b"retry:")
        for offset in range(3):
            assert (await anext(stream)).startswith(f"id: {offset}\n".encode())
        # The response is not read on: the feed waits with the next event in hand (and
        # nothing is to happen for a while: a deliberate wait).
        await asyncio.sleep(0.5)
        assert reads == [0], reads
    finally:
        await stream.aclose()


# Server-Sent Events under WSGI


def test_sse_under_wsgi_is_refused_with_501(
    run_burst: Callable[..., Any], reads: list[int]
) -> None:
    handle = start_workflow(sized, "out", 50, public=True)
    run_burst()
    response = Client().get(url(handle.workflow_id, "out"))  # Django's test client is WSGI
    assert response.status_code == 501
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    text = response.content.decode()
    assert "ASGI server" in text and "daphne" in text and "uvicorn" in text
    assert reads == []  # nothing of the stream was read, let alone collected
    assert Client().head(url(handle.workflow_id, "out")).status_code == 405
