"""The stream WebSocket, through the test suite's real ASGI application."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS

from durable_streams.bus import layer as ds_layer
from durable_streams.bus import uses_listen_notify
from durable_streams.web import feed as ds_feed
from tests.asgi import application
from tests.layers import wait_members
from tests.sockets import (
    READER_FIXTURES,
    entries,
    grant,
    make_user,
    no_polling,
    open_gate,
    open_socket,
    path,
    read_entries,
    read_until_closed,
    record_reads,
    run_all,
    start,
)
from tests.stored import stream_length
from tests.waiting import wait_until_async
from tests.workflows_readers import gated, keys, many, paced

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]


@pytest.fixture
async def background() -> AsyncIterator[Callable[..., asyncio.Task[Any]]]:
    """Run sync callables in threads for the test; each is awaited at the end."""
    tasks: list[asyncio.Task[Any]] = []

    def spawn(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(sync_to_async(fn, thread_sensitive=False)(*args, **kwargs))
        tasks.append(task)
        return task

    yield spawn
    for task in tasks:
        await asyncio.wait_for(task, 60)


# Backlog, live values, the close


async def test_a_quiet_socket_gets_heartbeats_at_the_configured_interval(
    live_worker: Any, settings: Any
) -> None:
    interval = 0.4
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "READER_HEARTBEAT_SECONDS": interval}
    wid = await start(gated, "out", ["a"], ["b"], "gate-heartbeat")
    await wait_until_async(lambda: stream_length(wid, "out") == 1)
    communicator = await open_socket(path(wid, "out"))
    assert (await read_entries(communicator, 1))[0]["value"] == "a"
    heard = [time.monotonic()]
    for _ in range(3):
        frame = await communicator.receive_json_from(timeout=10)
        heard.append(time.monotonic())
        assert frame == {"type": "heartbeat", "interval": interval}
    gaps = [later - earlier for earlier, later in zip(heard, heard[1:], strict=False)]
    # Each after a full interval of silence, not sooner (a loaded machine may be later).
    assert all(gap >= interval * 0.9 for gap in gaps), gaps
    # Heartbeats need no ack and do not get in the way of the values that follow.
    await open_gate("gate-heartbeat")
    frames, code = await read_until_closed(communicator)
    values = [f for f in frames if f["type"] != "heartbeat"]
    assert values == [
        {"type": "entry", "key": "out", "offset": 1, "value": "b"},
        {"type": "closed", "key": "out", "length": 2},
    ]
    assert code == 1000


async def test_backlog_then_live_then_closed(live_worker: Any) -> None:
    wid = await start(gated, "out", ["a", "b", "c"], ["d", "e"], "gate-live")
    await wait_until_async(lambda: stream_length(wid, "out") == 3)
    communicator = await open_socket(path(wid, "out"))
    backlog = await read_entries(communicator, 3)
    assert backlog == [
        {"type": "entry", "key": "out", "offset": 0, "value": "a"},
        {"type": "entry", "key": "out", "offset": 1, "value": "b"},
        {"type": "entry", "key": "out", "offset": 2, "value": "c"},
    ]
    assert await communicator.receive_nothing(timeout=0.3)
    await open_gate("gate-live")
    frames, code = await read_until_closed(communicator)
    assert frames == [
        {"type": "entry", "key": "out", "offset": 3, "value": "d"},
        {"type": "entry", "key": "out", "offset": 4, "value": "e"},
        {"type": "closed", "key": "out", "length": 5},
    ]
    assert code == 1000


async def test_resume_from_offset(run_burst: Any) -> None:
    wid = await start(many, "out", 5)
    await run_all(run_burst)
    frames, code = await read_until_closed(await open_socket(path(wid, "out", "offset=2")))
    assert entries(frames) == [(i, {"i": i, "text": f"value {i}"}) for i in (2, 3, 4)]
    assert frames[-1] == {"type": "closed", "key": "out", "length": 5}
    assert code == 1000
    # At the end, and past it: only the close.
    for offset in (5, 9):
        frames, code = await read_until_closed(
            await open_socket(path(wid, "out", f"offset={offset}"))
        )
        assert frames == [{"type": "closed", "key": "out", "length": 5}]
        assert code == 1000


async def test_values_round_trip_on_both_paths(live_worker: Any) -> None:
    values = [
        "héllo ✓ 漢字 🙂",
        "",
        0,
        -1.5,
        1e300,
        2**62,
        True,
        None,
        [1, [2, [3]]],
        {"quote": 'he said "hi"\n', "nested": {"a": []}},
    ]
    wid = await start(gated, "out", values, values, "gate-values")
    await wait_until_async(lambda: stream_length(wid, "out") == len(values))
    communicator = await open_socket(path(wid, "out"))
    await read_entries(communicator, len(values))  # the stored backlog
    await open_gate("gate-values")
    frames, _ = await read_until_closed(communicator)
    assert [value for _, value in entries(frames)] == values  # pushed live


async def test_stream_that_does_not_exist_yet_closes_with_the_workflow(run_burst: Any) -> None:
    wid = await start(many, "other", 2)
    communicator = await open_socket(path(wid, "never-written"))
    assert await communicator.receive_nothing(timeout=0.2)
    await run_all(run_burst)
    frames, code = await read_until_closed(communicator)
    assert frames == [{"type": "closed", "key": "never-written", "length": 0}]
    assert code == 1000


async def test_key_with_a_slash_and_unicode(run_burst: Any) -> None:
    wid = await start(many, "logs/é", 2)
    await run_all(run_burst)
    frames, _ = await read_until_closed(await open_socket(path(wid, "logs%2F%C3%A9")))
    assert [f["key"] for f in frames] == ["logs/é"] * 3
    assert entries(frames) == [(0, {"i": 0, "text": "value 0"}), (1, {"i": 1, "text": "value 1"})]


# Refusals


async def close_code(url: str, **kwargs: Any) -> tuple[int, str]:
    communicator = await open_socket(url, **kwargs)
    message = await communicator.receive_output(timeout=10)
    assert message["type"] == "websocket.close", message
    await communicator.wait(timeout=1)
    return message["code"], message.get("reason", "")


async def test_unknown_workflow_is_4404(db: None) -> None:
    code, reason = await close_code(path("no-such-workflow", "out"))
    assert (code, reason) == (4404, "No such workflow, or you may not read it.")


@pytest.mark.parametrize(
    "query",
    ["offset=-1", "offset=abc", "offset=1.5", "offset=", "offset=%2B1", "offset=1&offset=2"],
)
async def test_bad_offset_is_4400(run_burst: Any, query: str) -> None:
    wid = await start(many, "out", 1)
    code, reason = await close_code(path(wid, "out", query))
    assert code == 4400
    assert "offset" in reason.lower()


async def test_offset_too_large_and_key_too_long_are_4400(run_burst: Any) -> None:
    wid = await start(many, "out", 1)
    code, reason = await close_code(path(wid, "out", f"offset={2**31}"))
    assert code == 4400 and "2147483647" in reason
    code, reason = await close_code(path(wid, "k" * 256))
    assert code == 4400 and "at most 255" in reason


@pytest.mark.parametrize("workflow_id", ["a%00", "%00"])
async def test_a_workflow_id_no_database_can_hold_is_4400(db: None, workflow_id: str) -> None:
    # On PostgreSQL a NUL in the query failed it (DataError): the socket closed 1011.
    code, reason = await close_code(path(workflow_id, "out"))
    assert code == 4400 and "workflow id" in reason


async def test_the_trailing_slash_is_optional(run_burst: Any) -> None:
    wid = await start(many, "out", 2)
    await run_all(run_burst)
    communicator = await open_socket(f"/ws/durable-streams/{wid}/out?offset=1")
    frames, code = await read_until_closed(communicator)
    assert entries(frames) == [(1, {"i": 1, "text": "value 1"})] and code == 1000


@pytest.mark.parametrize(
    "url",
    [
        "/ws/durable-streams/",
        "/ws/durable-streams",
        "/ws/durable-streams/only-an-id",
        "/ws/durable-streams/only-an-id/",
        "/ws/durable-streams//out/",
    ],
)
async def test_a_path_under_the_prefix_that_is_no_address_is_4400(db: None, url: str) -> None:
    # The router found no route: HTTP 500 and a traceback.
    code, reason = await close_code(url)
    assert code == 4400 and "Not a stream address" in reason


async def test_private_workflow_answers_anonymous_and_strangers_as_missing(
    run_burst: Any,
) -> None:
    owner = await make_user("owner")
    stranger = await make_user("stranger")
    # Staff without the admin's permission to view workflows read nothing either.
    staff = await make_user("staff", is_staff=True)
    viewer = await grant(await make_user("viewer"), "view_workflow")
    superuser = await sync_to_async(get_user_model().objects.create_superuser)("root", "", "pw")
    handle = await sync_to_async(many.using(owner=owner).start)("out", 2)
    await run_all(run_burst)
    url = path(handle.workflow_id, "out")
    # The answer for a missing workflow, word for word: ids cannot be probed.
    missing = await close_code(path("no-such-workflow", "out"))
    for refused in (None, stranger, staff):
        assert await close_code(url, user=refused) == missing
    for reader in (owner, viewer, superuser):
        frames, code = await read_until_closed(await open_socket(url, user=reader))
        assert len(entries(frames)) == 2 and code == 1000


async def test_public_workflow_is_readable_by_anyone(run_burst: Any) -> None:
    wid = await start(many, "out", 1)
    await run_all(run_burst)
    frames, code = await read_until_closed(await open_socket(path(wid, "out")))
    assert entries(frames) == [(0, {"i": 0, "text": "value 0"})] and code == 1000


def only_key_public(user: Any, workflow: Any, key: str) -> bool:
    return key == "public"


async def test_the_authorization_setting_decides_per_key(run_burst: Any, settings: Any) -> None:
    settings.DURABLE_STREAMS = {
        **settings.DURABLE_STREAMS,
        "AUTHORIZE_READER": "tests.test_consumers.only_key_public",
    }
    handle = await sync_to_async(many.start)("public", 1)
    await run_all(run_burst)
    frames, code = await read_until_closed(await open_socket(path(handle.workflow_id, "public")))
    assert code == 1000 and len(entries(frames)) == 1
    assert (await close_code(path(handle.workflow_id, "secret")))[0] == 4404


@pytest.mark.parametrize(
    "headers",
    [[(b"origin", b"http://evil.example")], [], [(b"origin", b"http://testserver.evil")]],
    ids=["foreign", "missing", "suffix"],
)
async def test_origin_is_validated(run_burst: Any, headers: list[tuple[bytes, bytes]]) -> None:
    wid = await start(many, "out", 1)
    communicator = WebsocketCommunicator(application, path(wid, "out"), headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert not connected
    await communicator.wait(timeout=1)


async def test_server_error_closes_1011_without_details(
    run_burst: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wid = await start(many, "out", 1)

    def broken(*args: Any) -> Any:
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(ds_feed, "read_batch", broken)
    communicator = await open_socket(path(wid, "out"))
    message = await communicator.receive_output(timeout=10)
    assert message["type"] == "websocket.close"
    assert message["code"] == 1011
    assert "hunter2" not in json.dumps(message)
    assert "hunter2" in caplog.text  # logged on the server, for its operators


# Many readers, many keys, growth, lost notifications


async def test_many_keys_each_socket_gets_its_own(live_worker: Any) -> None:
    names = [f"k{i}" for i in range(8)]
    wid = await start(keys, names, 5, "gate-keys")
    sockets = {name: await open_socket(path(wid, name)) for name in names}
    await open_gate("gate-keys")
    for name, communicator in sockets.items():
        frames, code = await read_until_closed(communicator)
        assert entries(frames) == [(i, f"{name}:{i}") for i in range(5)]
        assert frames[-1] == {"type": "closed", "key": name, "length": 5}
        assert code == 1000


async def test_stream_grows_while_the_reader_catches_up(
    settings: Any, background: Any, run_burst: Any
) -> None:
    # Small batches: the catch-up takes many reads while the writer keeps going.
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "READ_BATCH_SIZE": 7}
    count = 400
    wid = await start(many, "out", count)
    background(run_burst)
    await wait_until_async(lambda: stream_length(wid, "out") >= 30)
    readers = [await open_socket(path(wid, "out", f"offset={n}")) for n in (0, 3)]
    for first, communicator in zip((0, 3), readers):
        frames, code = await read_until_closed(communicator, timeout=60)
        assert entries(frames) == [(i, {"i": i, "text": f"value {i}"}) for i in range(first, count)]
        assert frames[-1] == {"type": "closed", "key": "out", "length": count}
        assert code == 1000


async def test_lost_notifications_are_filled_from_the_database(
    settings: Any, monkeypatch: pytest.MonkeyPatch, live_worker: Any
) -> None:
    # No silence poll within the test: only gap detection can recover the lost values.
    no_polling(settings)
    publish = ds_layer.publish
    seen = {"entries": 0}

    def lossy(group: str, message: dict[str, Any]) -> None:
        if message["type"] == ds_layer.ENTRIES:
            seen["entries"] += 1
            if seen["entries"] % 2 == 0:
                return  # dropped, as a full channel would
        publish(group, message)

    monkeypatch.setattr(ds_layer, "publish", lossy)
    values = list(range(12))
    wid = await start(paced, "out", values, "gate-lossy", 0.01)
    communicator = await open_socket(path(wid, "out"))
    await wait_members(ds_layer.stream_group(wid, "out"), 1)  # what commits now is heard
    await open_gate("gate-lossy")
    frames, code = await read_until_closed(communicator, timeout=10)
    assert entries(frames) == list(enumerate(values))
    assert frames[-1] == {"type": "closed", "key": "out", "length": 12}
    assert code == 1000
    assert seen["entries"] == len(values)  # one notification per value, half of them lost


async def test_one_value_to_many_sockets_costs_no_query_per_socket(
    settings: Any, monkeypatch: pytest.MonkeyPatch, live_worker: Any
) -> None:
    no_polling(settings)
    reads = record_reads(monkeypatch)
    readers = 100
    values = [f"token {i}" for i in range(10)]
    wid = await start(paced, "out", values, "gate-fanout", 0.005)
    sockets = [await open_socket(path(wid, "out")) for _ in range(readers)]
    await wait_until_async(lambda: len(reads) >= readers)  # each socket's first look at the stream
    await open_gate("gate-fanout")
    for communicator in sockets:
        frames, code = await read_until_closed(communicator)
        assert [value for _, value in entries(frames)] == values
        assert code == 1000
    # The values and the close travelled in the notifications: no read beyond the first ones.
    assert len(reads) == readers


# The system check that explains the in-memory trade-off


def test_check_w002_explains_polling_without_a_shared_layer(settings: Any) -> None:
    from durable_streams.checks import check_live_delivery

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "POLL_INTERVAL": 0.25}
    (message,) = check_live_delivery()
    assert message.id == "durable_streams.W002"
    assert "in-memory channel layer" in message.msg
    if uses_listen_notify(DEFAULT_DB_ALIAS):
        # Woken by NOTIFY, the readers do not poll: they read once per committed batch.
        assert "notifications" in message.msg and "0.25s" not in message.msg
    else:
        assert "polling" in message.msg and "0.25s" in message.msg
    assert "RedisChannelLayer" in message.hint
    del settings.CHANNEL_LAYERS
    (message,) = check_live_delivery()
    assert "no channel layer" in message.msg
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:6379/0"]},
        }
    }
    assert check_live_delivery() == []


async def test_values_too_big_to_travel_are_read_from_the_database(live_worker: Any) -> None:
    big = "x" * (ds_layer.INLINE_LIMIT + 1)
    wid = await start(paced, "out", ["small", big, "after"], "gate-big", 0.01)
    communicator = await open_socket(path(wid, "out"))
    await wait_members(ds_layer.stream_group(wid, "out"), 1)  # what commits now is heard
    await open_gate("gate-big")
    frames, code = await read_until_closed(communicator)
    assert entries(frames) == [(0, "small"), (1, big), (2, "after")]
    assert code == 1000


def test_an_unreachable_channel_layer_never_reaches_the_workflow(
    settings: Any, run_burst: Any, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    monkeypatch.setattr(ds_layer._send_failures, "_last", -1e9)  # log the first failure
    # Nothing listens on port 9 of the loopback: every notification fails.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:9/0"]},
        }
    }
    handle = many.start("out", 20)
    started = time.monotonic()
    run_burst()
    assert handle.result(timeout=10) == 20
    assert time.monotonic() - started < 10
    assert [v["i"] for v in read_stream_values(handle.workflow_id)] == list(range(20))
    ds_layer._sender.flush(5.0)
    assert "Could not notify stream subscribers" in caplog.text


def read_stream_values(workflow_id: str) -> list[Any]:
    from durable_streams import read_stream

    return list(read_stream(workflow_id, "out", timeout=5))
