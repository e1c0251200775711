"""Many readers of one stream in one process share one channel layer subscription."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer
from channels.testing import WebsocketCommunicator

from durable_streams import delivery
from tests.test_consumers import (  # the fixtures apply here too
    _channel_layer_per_test,  # noqa: F401
    _close_thread_connections,  # noqa: F401
    entries,
    gated,
    keys,
    open_gate,
    open_socket,
    paced,
    path,
    read_entries,
    read_until_closed,
    start,
    stream_length,
    wait_for,
)
from tests.test_sse import get, url

pytestmark = pytest.mark.django_db(transaction=True)


async def members(group: str) -> set[str]:
    """The channels in ``group``, as the default channel layer holds them."""
    layer = delivery.channel_layer()
    if isinstance(layer, InMemoryChannelLayer):
        return set(layer.groups.get(group, {}))
    # channels-redis: a sorted set of channel names per group.
    connection = layer.connection(layer.consistent_hash(group))
    return {name.decode() for name in await connection.zrange(layer._group_key(group), 0, -1)}


async def wait_members(group: str, count: int, timeout: float = 10.0) -> set[str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await members(group)
        if len(found) == count:
            return found
        assert asyncio.get_running_loop().time() < deadline, (group, found)
        await asyncio.sleep(0.01)


def no_polling(settings: Any) -> None:
    # Neither a silence poll nor a poll without a shared layer within the test: every
    # value a socket gets came through the channel layer, or by gap detection.
    settings.DURABLE_STREAMS = {
        **settings.DURABLE_STREAMS,
        "POLL_INTERVAL": 30.0,
        "NOTIFY_FALLBACK_POLL": 30.0,
    }


async def close_all(sockets: list[WebsocketCommunicator]) -> None:
    for communicator in sockets:
        await communicator.disconnect()


async def test_many_sockets_one_group_member_every_value_once_in_order(
    settings: Any, live_worker: Any
) -> None:
    no_polling(settings)
    values = [f"token {i}" for i in range(15)]
    wid = await start(paced, "out", values, "gate-many", 0.005)
    sockets = [await open_socket(path(wid, "out")) for _ in range(40)]
    try:
        # One member for the whole process, in the stream's group and the workflow's.
        (channel,) = await wait_members(delivery.stream_group(wid, "out"), 1)
        assert await wait_members(delivery.workflow_group(wid), 1) == {channel}
        await asyncio.sleep(0.2)  # every socket past its first read
        assert await members(delivery.stream_group(wid, "out")) == {channel}
        await open_gate("gate-many")
        for communicator in sockets:
            frames, code = await read_until_closed(communicator)
            assert entries(frames) == list(enumerate(values))
            assert frames[-1] == {"type": "closed", "key": "out", "length": len(values)}
            assert code == 1000
    finally:
        await close_all(sockets)
    # The last reader gone, the process left both groups.
    await wait_members(delivery.stream_group(wid, "out"), 0)
    await wait_members(delivery.workflow_group(wid), 0)


async def test_the_last_socket_of_a_stream_leaving_discards_its_group(live_worker: Any) -> None:
    wid = await start(keys, ["a", "b"], 3, "gate-leave")
    group_a, group_b = delivery.stream_group(wid, "a"), delivery.stream_group(wid, "b")
    on_a = [await open_socket(path(wid, "a")) for _ in range(3)]
    on_b = await open_socket(path(wid, "b"))
    try:
        (channel,) = await wait_members(group_a, 1)
        assert await wait_members(group_b, 1) == {channel}  # one channel for every stream
        assert await wait_members(delivery.workflow_group(wid), 1) == {channel}
        await on_a[0].disconnect()
        await on_a[1].disconnect()
        await asyncio.sleep(0.1)
        assert await members(group_a) == {channel}  # one reader of "a" is left
        await on_a[2].disconnect()
        await wait_members(group_a, 0)
        # "b" still reads: its group and the workflow's stay.
        assert await members(group_b) == {channel}
        assert await members(delivery.workflow_group(wid)) == {channel}
        await open_gate("gate-leave")
        frames, code = await read_until_closed(on_b)
        assert entries(frames) == [(i, f"b:{i}") for i in range(3)] and code == 1000
    finally:
        await close_all([*on_a, on_b])
    await wait_members(group_b, 0)
    await wait_members(delivery.workflow_group(wid), 0)


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
        await asyncio.sleep(0.1)
        await open_gate("gate-late")
        # Join while values flow, at an offset already stored and one not yet.
        await read_entries(first, 10)
        late.append(await open_socket(path(wid, "out", "offset=3")))
        await wait_for(lambda: stream_length(wid, "out") >= 20)
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
    await wait_for(lambda: stream_length(wid, "out") == 1)
    socket = await open_socket(path(wid, "out"))
    response = await get(url(wid, "out"))
    try:
        assert json.loads((await response.event())["data"])["value"] == "a"
        assert (await socket.receive_json_from(timeout=10))["value"] == "a"
        await wait_members(delivery.stream_group(wid, "out"), 1)
        await open_gate("gate-mixed")
        events = await response.until_closed()
        assert [json.loads(e["data"]).get("value") for e in events] == ["b", "c", None]
        frames, code = await read_until_closed(socket)
        assert entries(frames) == [(1, "b"), (2, "c")] and code == 1000
    finally:
        await socket.disconnect()
        await response.communicator.send_input({"type": "http.disconnect"})
        await response.communicator.wait(timeout=5)
    await wait_members(delivery.stream_group(wid, "out"), 0)


async def test_a_failing_receive_is_restarted(
    settings: Any, live_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_polling(settings)
    layer = delivery.channel_layer()
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
        await wait_members(delivery.stream_group(wid, "out"), 1)
        await asyncio.sleep(0.5)  # past the failures and their backoff
        assert failures["left"] == 0
        await open_gate("gate-flaky")
        frames, code = await read_until_closed(communicator, timeout=10)
        assert entries(frames) == list(enumerate(values)) and code == 1000
    finally:
        await communicator.disconnect()


async def test_a_long_subscription_stays_in_its_group_past_the_group_expiry(
    settings: Any, live_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_polling(settings)
    layer = delivery.channel_layer()
    # The hub re-joins every max(expiry / 4, 1) seconds. The layer outlives the test.
    monkeypatch.setattr(layer, "group_expiry", 2, raising=False)
    wid = await start(gated, "out", [], ["late"], "gate-expiry")
    communicator = await open_socket(path(wid, "out"))
    try:
        await wait_members(delivery.stream_group(wid, "out"), 1)
        await asyncio.sleep(3.5)  # a member that joined once would be expired by now
        await open_gate("gate-expiry")
        frames, code = await read_until_closed(communicator, timeout=5)
        assert entries(frames) == [(0, "late")] and code == 1000
    finally:
        await communicator.disconnect()


async def test_a_lost_message_costs_one_read_for_all_sockets_not_one_each(
    settings: Any, monkeypatch: pytest.MonkeyPatch, live_worker: Any
) -> None:
    no_polling(settings)
    reads: list[int] = []
    read_batch = delivery.read_batch

    def counted(workflow_id: str, key: str, offset: int) -> delivery.Batch:
        reads.append(offset)
        return read_batch(workflow_id, key, offset)

    publish = delivery.publish

    def lossy(group: str, message: dict[str, Any]) -> None:
        if message["type"] == delivery.ENTRIES and message["offset"] in (3, 6):
            return  # dropped, as a full channel would
        publish(group, message)

    monkeypatch.setattr(delivery, "read_batch", counted)
    monkeypatch.setattr(delivery, "publish", lossy)
    readers = 30
    values = list(range(10))
    wid = await start(paced, "out", values, "gate-shared-read", 0.02)
    sockets = [await open_socket(path(wid, "out")) for _ in range(readers)]
    try:
        await wait_for(lambda: len(reads) >= readers)  # each socket's first look
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
    reads: list[float] = []
    read_batch = delivery.read_batch

    def counted(workflow_id: str, key: str, offset: int) -> delivery.Batch:
        reads.append(loop.time())
        return read_batch(workflow_id, key, offset)

    monkeypatch.setattr(delivery, "read_batch", counted)
    wid = await start(gated, "out", [], [], "gate-never")  # never run: the stream stays empty
    feed = delivery.StreamFeed(wid, "out", 0)
    feed.pushed = True  # as with a layer that reaches other processes
    events = feed.events()
    waiting = asyncio.ensure_future(events.__anext__())
    try:
        # Silence polls after 0.05, 0.1, 0.2, 0.4 s...: the next one is 0.8 s after the
        # fourth, at about 1.55 s.
        await asyncio.sleep(1.0)
        polled = len(reads)
        assert 4 <= polled <= 6, reads
        # A message (one the feed has no use for) ends the silence: back to 0.05 s.
        feed.notify(
            {"type": delivery.ENTRIES, "workflow": wid, "key": "out", "offset": 0, "count": 0}
        )
        await asyncio.sleep(0.3)
        assert len(reads) > polled, reads
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await events.aclose()


async def test_a_failing_join_neither_stalls_the_sockets_nor_stays_unjoined(
    live_worker: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    layer = delivery.channel_layer()
    group_add = layer.group_add
    attempts = {"failed": 0}

    async def down(group: str, channel: str) -> None:
        attempts["failed"] += 1
        raise ConnectionError("the layer is down")

    monkeypatch.setattr(layer, "group_add", down)
    monkeypatch.setattr(delivery, "RETRY_FIRST", 1.0)  # the hub's first retry after 1 s
    monkeypatch.setattr(delivery._subscribe_failures, "_last", -1e9)  # log the first failure
    wid = await start(gated, "out", ["a"], ["b"], "gate-join")
    await wait_for(lambda: stream_length(wid, "out") == 1)
    sockets = [await open_socket(path(wid, "out")) for _ in range(5)]
    try:
        # The backlog comes at once: one failed join, not one attempt per socket in turn.
        for communicator in sockets:
            assert (await communicator.receive_json_from(timeout=5))["value"] == "a"
        assert 1 <= attempts["failed"] <= 2, attempts  # the two groups of the first socket
        assert "Could not join a stream's group" in caplog.text
        monkeypatch.setattr(layer, "group_add", group_add)  # the layer is back
        await wait_members(delivery.stream_group(wid, "out"), 1)  # rejoined, with backoff
        await open_gate("gate-join")
        for communicator in sockets:
            frames, code = await read_until_closed(communicator)
            assert entries(frames) == [(1, "b")] and code == 1000
    finally:
        await close_all(sockets)


class _CarryOnLayer:
    """A channel layer whose receive lets its first cancellation go by and carries on.

    The Redis client can do this on Python 3.11 (``asyncio.wait_for`` drops a
    cancellation that arrives as its operation completes).
    """

    def __init__(self) -> None:
        self.cancellations = 0
        self.receive_ended = asyncio.Event()

    async def new_channel(self) -> str:
        return "hub-test!1"

    async def group_add(self, group: str, channel: str) -> None:
        pass

    async def group_discard(self, group: str, channel: str) -> None:
        pass

    async def receive(self, channel: str) -> dict[str, Any]:
        try:
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    self.cancellations += 1
                    if self.cancellations > 1:
                        raise
        finally:
            self.receive_ended.set()


class _Feed:
    def __init__(self, workflow_id: str, key: str) -> None:
        self.workflow_id, self.key = workflow_id, key
        self.groups = [
            delivery.stream_group(workflow_id, key),
            delivery.workflow_group(workflow_id),
        ]


async def test_the_last_feed_leaving_ends_the_receive_even_if_a_cancellation_is_lost() -> None:
    layer = _CarryOnLayer()
    hub = delivery._Hub(layer)
    feed = _Feed("wf-carry-on", "out")
    await hub.subscribe(feed)  # type: ignore[arg-type]
    background = list(hub._background)
    assert len(background) == 2 and not any(task.done() for task in background)
    await hub.unsubscribe(feed)  # type: ignore[arg-type]
    await asyncio.wait_for(layer.receive_ended.wait(), 2)
    await asyncio.wait_for(asyncio.wait(background), 2)
    assert layer.cancellations == 2
    assert all(task.cancelled() for task in background)


async def test_a_cancelled_hub_stops_at_once_even_if_the_layer_carries_on() -> None:
    # What a closing event loop does: cancel every task once.
    layer = _CarryOnLayer()
    hub = delivery._Hub(layer)
    feed = _Feed("wf-carry-on-2", "out")
    await hub.subscribe(feed)  # type: ignore[arg-type]
    receiving, keeping = hub._background
    for task in (receiving, keeping):
        task.cancel()
    await asyncio.wait_for(asyncio.wait({receiving, keeping}), 1)
    await asyncio.wait_for(layer.receive_ended.wait(), 2)
    assert receiving.cancelled() and keeping.cancelled()
    assert layer.cancellations == 2
