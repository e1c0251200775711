"""Many readers of one stream in one process share one channel layer subscription."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator

from durable_streams.bus import layer as ds_layer
from durable_streams.web import feed as ds_feed
from tests.layers import members, wait_members
from tests.sockets import (
    READER_FIXTURES,
    entries,
    no_polling,
    open_gate,
    open_socket,
    path,
    read_entries,
    read_until_closed,
    record_reads,
    start,
)
from tests.stored import stream_length
from tests.test_sse import get, url
from tests.waiting import wait_until_async
from tests.workflows_readers import gated, keys, paced

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]


async def close_all(sockets: list[WebsocketCommunicator]) -> None:
    for communicator in sockets:
        await communicator.disconnect()


async def test_many_sockets_one_group_member_every_value_once_in_order(
    settings: Any, live_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_polling(settings)
    reads = record_reads(monkeypatch)
    values = [f"token {i}" for i in range(15)]
    wid = await start(paced, "out", values, "gate-many", 0.005)
    sockets = [await open_socket(path(wid, "out")) for _ in range(40)]
    try:
        # One member for the whole process, in the stream's group and the workflow's.
        (channel,) = await wait_members(ds_layer.stream_group(wid, "out"), 1)
        assert await wait_members(ds_layer.workflow_group(wid), 1) == {channel}
        await wait_until_async(lambda: len(reads) >= 40, what="every socket's first read")
        assert await members(ds_layer.stream_group(wid, "out")) == {channel}
        await open_gate("gate-many")
        for communicator in sockets:
            frames, code = await read_until_closed(communicator)
            assert entries(frames) == list(enumerate(values))
            assert frames[-1] == {"type": "closed", "key": "out", "length": len(values)}
            assert code == 1000
    finally:
        await close_all(sockets)
    # The last reader gone, the process left both groups.
    await wait_members(ds_layer.stream_group(wid, "out"), 0)
    await wait_members(ds_layer.workflow_group(wid), 0)


async def test_the_last_socket_of_a_stream_leaving_discards_its_group(live_worker: Any) -> None:
    wid = await start(keys, ["a", "b"], 3, "gate-leave")
    group_a, group_b = ds_layer.stream_group(wid, "a"), ds_layer.stream_group(wid, "b")
    on_a = [await open_socket(path(wid, "a")) for _ in range(3)]
    on_b = await open_socket(path(wid, "b"))
    try:
        (channel,) = await wait_members(group_a, 1)
        assert await wait_members(group_b, 1) == {channel}  # one channel for every stream
        assert await wait_members(ds_layer.workflow_group(wid), 1) == {channel}
        await on_a[0].disconnect()
        await on_a[1].disconnect()
        hub = ds_layer.local_hub()
        assert hub is not None

        async def departures_handled() -> bool:
            # Both counted, and no join or leave of a group under way.
            member = hub._members.get(group_a)
            return member is not None and member.count == 1 and not hub._tasks

        await wait_until_async(departures_handled, what="the two departures")
        assert await members(group_a) == {channel}  # one reader of "a" is left
        await on_a[2].disconnect()
        await wait_members(group_a, 0)
        # "b" still reads: its group and the workflow's stay.
        assert await members(group_b) == {channel}
        assert await members(ds_layer.workflow_group(wid)) == {channel}
        await open_gate("gate-leave")
        frames, code = await read_until_closed(on_b)
        assert entries(frames) == [(i, f"b:{i}") for i in range(3)] and code == 1000
    finally:
        await close_all([*on_a, on_b])
    await wait_members(group_b, 0)
    await wait_members(ds_layer.workflow_group(wid), 0)


async def test_a_late_socket_with_an_offset_gets_backlog_then_live_without_gap(
    settings: Any, live_worker: Any
) -> None:
    no_polling(settings)
    count = 60
    values = list(range(count))
    wid = await start(paced, "out", values, "gate-late", 0.01)
    first = await open_socket(path(wid, "out"))
    late: list[WebsocketCommunicator] = []
    try:
        await wait_members(ds_layer.stream_group(wid, "out"), 1)  # what commits now is heard
        await open_gate("gate-late")
        # Join while values flow, at an offset already stored and one not yet.
        await read_entries(first, 10)
        late.append(await open_socket(path(wid, "out", "offset=3")))
        await wait_until_async(lambda: stream_length(wid, "out") >= 20)
        late.append(await open_socket(path(wid, "out", "offset=40")))
        frames, code = await read_until_closed(first)
        assert entries(frames) == [(i, i) for i in range(10, count)] and code == 1000
        for start_at, communicator in zip((3, 40), late):
            frames, code = await read_until_closed(communicator)
            assert entries(frames) == [(i, i) for i in range(start_at, count)]
            assert frames[-1] == {"type": "closed", "key": "out", "length": count}
            assert code == 1000
    finally:
        await close_all([first, *late])


async def test_sse_and_websocket_readers_share_the_subscription(live_worker: Any) -> None:
    wid = await start(gated, "out", ["a"], ["b", "c"], "gate-mixed")
    await wait_until_async(lambda: stream_length(wid, "out") == 1)
    socket = await open_socket(path(wid, "out"))
    response = await get(url(wid, "out"))
    try:
        assert json.loads((await response.event())["data"])["value"] == "a"
        assert (await socket.receive_json_from(timeout=10))["value"] == "a"
        await wait_members(ds_layer.stream_group(wid, "out"), 1)
        await open_gate("gate-mixed")
        events = await response.until_closed()
        assert [json.loads(e["data"]).get("value") for e in events] == ["b", "c", None]
        frames, code = await read_until_closed(socket)
        assert entries(frames) == [(1, "b"), (2, "c")] and code == 1000
    finally:
        await socket.disconnect()
        await response.communicator.send_input({"type": "http.disconnect"})
        await response.communicator.wait(timeout=5)
    await wait_members(ds_layer.stream_group(wid, "out"), 0)


async def test_a_failing_receive_is_restarted(
    settings: Any, live_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_polling(settings)
    layer = ds_layer.channel_layer()
    receive = layer.receive
    failures = {"left": 3}

    async def flaky(channel: str) -> dict[str, Any]:
        if failures["left"]:
            failures["left"] -= 1
            await asyncio.sleep(0)
            raise ConnectionError("the layer is down")
        return await receive(channel)

    monkeypatch.setattr(layer, "receive", flaky)
    values = list(range(5))
    wid = await start(paced, "out", values, "gate-flaky", 0.01)
    communicator = await open_socket(path(wid, "out"))
    try:
        await wait_members(ds_layer.stream_group(wid, "out"), 1)
        await wait_until_async(lambda: failures["left"] == 0, what="the three failures")
        await open_gate("gate-flaky")
        frames, code = await read_until_closed(communicator, timeout=10)
        assert entries(frames) == list(enumerate(values)) and code == 1000
    finally:
        await communicator.disconnect()


async def test_a_long_subscription_stays_in_its_group_past_the_group_expiry(
    settings: Any, live_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_polling(settings)
    layer = ds_layer.channel_layer()
    # The hub re-joins every max(expiry / 4, 1) seconds. The layer outlives the test.
    monkeypatch.setattr(layer, "group_expiry", 2, raising=False)
    wid = await start(gated, "out", [], ["late"], "gate-expiry")
    communicator = await open_socket(path(wid, "out"))
    try:
        await wait_members(ds_layer.stream_group(wid, "out"), 1)
        # Time passing is the point: a member that joined once would be expired by now.
        await asyncio.sleep(3.5)
        await open_gate("gate-expiry")
        frames, code = await read_until_closed(communicator, timeout=5)
        assert entries(frames) == [(0, "late")] and code == 1000
    finally:
        await communicator.disconnect()


async def test_a_lost_message_costs_one_read_for_all_sockets_not_one_each(
    settings: Any, monkeypatch: pytest.MonkeyPatch, live_worker: Any
) -> None:
    no_polling(settings)
    reads = record_reads(monkeypatch)
    publish = ds_layer.publish

    def lossy(group: str, message: dict[str, Any]) -> None:
        if message["type"] == ds_layer.ENTRIES and message["offset"] in (3, 6):
            return  # dropped, as a full channel would
        publish(group, message)

    monkeypatch.setattr(ds_layer, "publish", lossy)
    readers = 30
    values = list(range(10))
    wid = await start(paced, "out", values, "gate-shared-read", 0.02)
    sockets = [await open_socket(path(wid, "out")) for _ in range(readers)]
    try:
        await wait_until_async(lambda: len(reads) >= readers)  # each socket's first look
        await open_gate("gate-shared-read")
        for communicator in sockets:
            frames, code = await read_until_closed(communicator)
            assert entries(frames) == list(enumerate(values)) and code == 1000
    finally:
        await close_all(sockets)
    # Two gaps, each filled by one read that every socket shared.
    assert readers < len(reads) <= readers + 2, reads


async def test_a_message_after_a_long_silence_brings_the_silence_poll_back_to_its_base(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "NOTIFY_FALLBACK_POLL": 0.05}
    loop = asyncio.get_running_loop()
    reads = record_reads(monkeypatch, times=True)
    wid = await start(gated, "out", [], [], "gate-never")  # never run: the stream stays empty
    feed = ds_feed.StreamFeed(wid, "out", 0)
    feed.pushed = True  # as with a layer that reaches other processes
    events = feed.events()
    waiting = asyncio.ensure_future(events.__anext__())
    try:
        # The first read, then silence polls 0.05, 0.1, 0.2, 0.4 s apart: at least that
        # (a busy machine makes a poll later, never sooner); without the backoff every
        # gap would be 0.05 s.
        await wait_until_async(lambda: len(reads) >= 5, what="four silence polls")
        gaps = [later - earlier for earlier, later in zip(reads, reads[1:5])]
        assert all(gap >= 0.9 * 0.05 * 2**i for i, gap in enumerate(gaps)), reads
        # The next poll waits 0.8 s, the one after it 1.6 s. A message (one the feed has no
        # use for) ends the silence: back to 0.05 s, then 0.1 s.
        polled = len(reads)
        notified = loop.time()
        feed.notify(
            {"type": ds_layer.ENTRIES, "workflow": wid, "key": "out", "offset": 0, "count": 0}
        )
        await wait_until_async(lambda: len(reads) >= polled + 2, what="two more polls")
        # Two polls well within the 2.4 s that the backed-off ones would take.
        assert reads[polled + 1] - notified < 1.5, (notified, reads)
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await events.aclose()


async def test_a_failing_join_neither_stalls_the_sockets_nor_stays_unjoined(
    live_worker: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    layer = ds_layer.channel_layer()
    group_add = layer.group_add
    attempts = {"failed": 0}

    async def down(group: str, channel: str) -> None:
        attempts["failed"] += 1
        raise ConnectionError("the layer is down")

    monkeypatch.setattr(layer, "group_add", down)
    monkeypatch.setattr(ds_layer, "RETRY_FIRST", 1.0)  # the hub's first retry after 1 s
    monkeypatch.setattr(ds_layer._subscribe_failures, "_last", -1e9)  # log the first failure
    wid = await start(gated, "out", ["a"], ["b"], "gate-join")
    await wait_until_async(lambda: stream_length(wid, "out") == 1)
    sockets = [await open_socket(path(wid, "out")) for _ in range(5)]
    try:
        # The backlog comes at once: one failed join, not one attempt per socket in turn.
        for communicator in sockets:
            assert (await communicator.receive_json_from(timeout=5))["value"] == "a"
        assert 1 <= attempts["failed"] <= 2, attempts  # the two groups of the first socket
        assert "Could not join a stream's group" in caplog.text
        monkeypatch.setattr(layer, "group_add", group_add)  # the layer is back
        await wait_members(ds_layer.stream_group(wid, "out"), 1)  # rejoined, with backoff
        await open_gate("gate-join")
        for communicator in sockets:
            frames, code = await read_until_closed(communicator)
            assert entries(frames) == [(1, "b")] and code == 1000
    finally:
        await close_all(sockets)
