"""A stream that a cancel or a failure ended is interrupted, not closed: readers are told
so, stay connected, and follow the resumed run to the final close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS
from django.test import Client
from django.utils import timezone

from durable_streams import (
    WorkflowCancelled,
    WorkflowFailed,
    aread_stream,
    cancel_workflow,
    read_stream,
    start_workflow,
)
from durable_streams.bus import publish_changes
from durable_streams.models import Status, Stream, StreamEntry, Workflow
from durable_streams.web import feed as ds_feed
from durable_streams.worker import Worker
from tests.processes import WorkerProcesses, worker_processes
from tests.sockets import (
    READER_FIXTURES,
    open_gate,
    open_socket,
    path,
    read_until_closed,
)
from tests.stored import stream_length
from tests.test_sse import get, url
from tests.waiting import wait_until_async
from tests.workflows_interrupted import interruptible

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]

BEFORE, AFTER = ["a", "b", "c"], ["d", "e", {"f": [1]}]


def begin(gate: str, *, fail: bool = False) -> str:
    handle = start_workflow(interruptible, "out", BEFORE, AFTER, gate, fail, public=True)
    return handle.workflow_id


def status_of(workflow_id: str) -> str:
    return Workflow.objects.values_list("status", flat=True).get(pk=workflow_id)


def resume(workflow_id: str) -> list[str]:
    resumed, changes = Workflow.objects.filter(pk=workflow_id).resume()
    publish_changes(changes, DEFAULT_DB_ALIAS)
    return resumed


async def interrupt(workflow_id: str, *, fail: bool) -> str:
    """Cancel the run waiting at its gate (or wait for it to fail there); return the status."""
    await wait_until_async(lambda: stream_length(workflow_id, "out") == len(BEFORE))
    if fail:
        await wait_until_async(lambda: status_of(workflow_id) == Status.ERROR)
        return Status.ERROR
    assert await sync_to_async(cancel_workflow)(workflow_id)
    return Status.CANCELLED


async def next_frame(communicator: Any, timeout: float = 10.0) -> dict[str, Any]:
    return await communicator.receive_json_from(timeout=timeout)


# What the database says


def test_the_position_tells_a_final_close_from_an_interruption(db: None) -> None:
    from durable_streams.models import StreamState

    now = timezone.now()

    def run(status: str) -> str:
        workflow = Workflow.objects.create(
            name="tests.any", status=status, inputs="{}", max_attempts=1
        )
        return workflow.pk

    def stream(workflow_id: str, key: str, *, by_end: bool) -> Stream:
        return Stream.objects.create(
            workflow_id=workflow_id, key=key, length=2, closed_at=now, closed_by_end=by_end
        )

    for status in (Status.CANCELLED, Status.ERROR):
        wid = run(status)
        ended = stream(wid, "ended", by_end=True)
        closed = stream(wid, "closed", by_end=False)
        position = Stream.objects.position(wid, "ended")
        assert position == (ended.pk, 2, True, status)
        assert position.state == StreamState.INTERRUPTED
        assert Stream.objects.position(wid, "closed") == (closed.pk, 2, True, None)
        assert Stream.objects.position(wid, "closed").state == StreamState.CLOSED
        # Never written to: empty, and interrupted too (a resumed run may write to it).
        assert Stream.objects.position(wid, "never") == (None, 0, True, status)
        assert [s.state for s in Stream.objects.filter(workflow_id=wid).order_by("key")] == [
            StreamState.CLOSED,
            StreamState.INTERRUPTED,
        ]
    wid = run(Status.SUCCESS)
    ended = stream(wid, "ended", by_end=True)
    assert Stream.objects.position(wid, "ended") == (ended.pk, 2, True, None)
    assert Stream.objects.position(wid, "never").state == StreamState.CLOSED
    assert Stream.objects.get(pk=ended.pk).state == StreamState.CLOSED
    wid = run(Status.ENQUEUED)
    assert Stream.objects.position(wid, "never").state == StreamState.OPEN


# The WebSocket


@pytest.mark.parametrize("fail", [False, True], ids=["cancelled", "failed"])
async def test_a_socket_is_told_interrupted_and_follows_the_resume_to_the_close(
    live_worker: Worker, fail: bool
) -> None:
    gate = f"ws-gate-{fail}"
    wid = await sync_to_async(begin)(gate, fail=fail)
    communicator = await open_socket(path(wid, "out"))
    header = await open_socket(path(wid, "header"))
    status = await interrupt(wid, fail=fail)
    frames = [await next_frame(communicator) for _ in range(len(BEFORE) + 1)]
    assert frames == [
        *({"type": "entry", "key": "out", "offset": i, "value": v} for i, v in enumerate(BEFORE)),
        {"type": "interrupted", "key": "out", "length": len(BEFORE), "status": status},
    ]
    # Not an end: the socket stays open.
    assert await communicator.receive_nothing(timeout=0.5)
    # The stream that close_stream() closed before the end is closed for good.
    assert await read_until_closed(header) == (
        [
            {"type": "entry", "key": "header", "offset": 0, "value": "hello"},
            {"type": "closed", "key": "header", "length": 1},
        ],
        1000,
    )
    await open_gate(gate)
    assert await sync_to_async(resume)(wid) == [wid]
    frames, code = await read_until_closed(communicator)
    assert frames == [
        *(
            {"type": "entry", "key": "out", "offset": len(BEFORE) + i, "value": v}
            for i, v in enumerate(AFTER)
        ),
        {"type": "closed", "key": "out", "length": len(BEFORE) + len(AFTER)},
    ]
    assert code == 1000
    await wait_until_async(lambda: status_of(wid) == Status.SUCCESS)


async def test_a_socket_opened_on_an_interrupted_stream_is_told_at_once(
    live_worker: Worker,
) -> None:
    wid = await sync_to_async(begin)("late-gate")
    await interrupt(wid, fail=False)
    await wait_until_async(lambda: stream_length(wid, "out") == len(BEFORE))
    communicator = await open_socket(path(wid, "out", "offset=1"))
    frames = [await next_frame(communicator) for _ in range(3)]
    assert frames[-1] == {
        "type": "interrupted",
        "key": "out",
        "length": len(BEFORE),
        "status": "CANCELLED",
    }
    assert [f["offset"] for f in frames[:-1]] == [1, 2]
    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect()


@pytest.fixture
def processes(transactional_db: None, tmp_path: Path) -> Iterator[WorkerProcesses]:
    with worker_processes(tmp_path) as started:
        yield started


async def test_a_socket_follows_a_worker_process_through_cancel_and_resume(
    processes: WorkerProcesses,
) -> None:
    wid = await sync_to_async(begin)("process-gate")
    await sync_to_async(processes.start)("interrupted-1")
    communicator = await open_socket(path(wid, "out"))
    await interrupt(wid, fail=False)
    frames = [await next_frame(communicator, 20) for _ in range(len(BEFORE) + 1)]
    assert [f.get("offset") for f in frames] == [0, 1, 2, None]
    assert frames[-1]["type"] == "interrupted" and frames[-1]["status"] == "CANCELLED"
    # The run is cancelled a second time after the resume, before its gate opens.
    assert await sync_to_async(resume)(wid) == [wid]
    await wait_until_async(lambda: status_of(wid) == Status.RUNNING, timeout=20)
    await interrupt(wid, fail=False)
    again = await next_frame(communicator, 20)
    assert again == {"type": "interrupted", "key": "out", "length": 3, "status": "CANCELLED"}
    await open_gate("process-gate")
    assert await sync_to_async(resume)(wid) == [wid]
    frames, code = await read_until_closed(communicator, timeout=30)
    assert [(f["type"], f.get("offset")) for f in frames] == [
        ("entry", 3),
        ("entry", 4),
        ("entry", 5),
        ("closed", None),
    ]
    assert code == 1000


# Server-Sent Events


async def test_an_event_stream_is_told_interrupted_and_follows_the_resume(
    live_worker: Worker,
) -> None:
    wid = await sync_to_async(begin)("sse-gate")
    response = await get(url(wid, "out"))
    assert response.status == 200
    status = await interrupt(wid, fail=False)
    events = [await response.event() for _ in range(len(BEFORE) + 1)]
    assert [e["event"] for e in events] == ["entry"] * len(BEFORE) + ["interrupted"]
    assert [e["id"] for e in events[:-1]] == ["0", "1", "2"]
    assert json.loads(events[-1]["data"]) == {
        "type": "interrupted",
        "key": "out",
        "length": len(BEFORE),
        "status": status,
    }
    assert "id" not in events[-1]
    await open_gate("sse-gate")
    assert await sync_to_async(resume)(wid) == [wid]
    rest = await response.until_closed(timeout=20)
    assert [(e["event"], e.get("id")) for e in rest] == [
        ("entry", "3"),
        ("entry", "4"),
        ("entry", "5"),
        ("closed", None),
    ]
    assert [json.loads(e["data"]).get("value") for e in rest[:-1]] == AFTER
    assert response.ended


# read_stream and aread_stream


def test_read_stream_raises_workflow_cancelled_after_the_values(
    worker_thread: Callable[..., Worker],
) -> None:
    wid = begin("read-gate")
    worker_thread()
    reader = read_stream(wid, "out", timeout=10)
    got = [next(reader) for _ in BEFORE]
    assert cancel_workflow(wid)
    with pytest.raises(WorkflowCancelled) as cancelled:
        got.extend(reader)
    assert got == BEFORE
    error = cancelled.value
    assert (error.workflow_id, error.key, error.length) == (wid, "out", len(BEFORE))
    assert "interrupted at length 3" in str(error)
    # A stream that close_stream() closed ends as it always did.
    assert list(read_stream(wid, "header", timeout=5)) == ["hello"]
    # Resumed, the rest can be read from where it stopped.
    resume(wid)
    open_gate_now("read-gate")
    assert list(read_stream(wid, "out", offset=error.length, timeout=10)) == AFTER


def open_gate_now(label: str) -> None:
    from tests.models import Effect

    Effect.objects.create(workflow_id="", label=label)


def test_read_stream_raises_workflow_failed_with_the_error(
    run_burst: Callable[..., Worker],
) -> None:
    wid = begin("shut-gate", fail=True)
    run_burst()
    assert status_of(wid) == Status.ERROR
    got: list[Any] = []
    with pytest.raises(WorkflowFailed) as failed:
        got.extend(read_stream(wid, "out", timeout=5))
    assert got == BEFORE
    error = failed.value
    assert (error.key, error.length) == ("out", len(BEFORE))
    assert error.error_type == "StepFailed" and "gate shut-gate is shut" in error.message
    # Read from past its end, it still says where the stream stopped.
    with pytest.raises(WorkflowFailed) as past:
        got.extend(read_stream(wid, "out", offset=10, timeout=5))
    assert (past.value.length, got) == (len(BEFORE), BEFORE)
    # A stream the run never wrote to is interrupted too, at length 0.
    with pytest.raises(WorkflowFailed) as empty:
        list(read_stream(wid, "never written", timeout=5))
    assert (empty.value.key, empty.value.length) == ("never written", 0)


async def test_aread_stream_raises_too(live_worker: Worker) -> None:
    wid = await sync_to_async(begin)("aread-gate")
    await interrupt(wid, fail=False)
    got = []
    with pytest.raises(WorkflowCancelled) as cancelled:
        async for value in aread_stream(wid, "out", timeout=10):
            got.append(value)
    assert got == BEFORE
    assert (cancelled.value.key, cancelled.value.length) == ("out", len(BEFORE))


# The feed, and the admin


async def test_the_feed_says_interrupted_once_per_interruption(settings: Any, db: None) -> None:
    # No channel layer: the feed polls the database every POLL_INTERVAL.
    settings.CHANNEL_LAYERS = {}
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "POLL_INTERVAL": 0.01}

    def setup() -> str:
        workflow = Workflow.objects.create(
            name="tests.any", status=Status.CANCELLED, inputs="{}", max_attempts=1
        )
        stream = Stream.objects.create(
            workflow=workflow, key="out", length=1, closed_at=timezone.now(), closed_by_end=True
        )
        StreamEntry.objects.create(stream=stream, offset=0, value='"x"')
        return workflow.pk

    wid = await sync_to_async(setup)()
    feed = ds_feed.StreamFeed(wid, "out", 0)
    events = feed.events()
    assert await anext(events) == ds_feed.Entry(0, '"x"')
    assert await anext(events) == ds_feed.Interrupted(1, "CANCELLED")
    # Polled again and again meanwhile, it says nothing more until the stream changes.
    fetches = feed.fetches
    pending = asyncio.ensure_future(anext(events))
    deadline = time.monotonic() + 5
    while feed.fetches < fetches + 5:
        assert time.monotonic() < deadline and not pending.done()
        await asyncio.sleep(0.01)
    await sync_to_async(resume)(wid)
    # A read that started after the resume sees the stream open again.
    fetches = feed.fetches
    while feed.fetches < fetches + 2:
        assert time.monotonic() < deadline + 5 and not pending.done()
        await asyncio.sleep(0.01)
    await sync_to_async(
        lambda: (
            Workflow.objects.filter(pk=wid).update(status=Status.ERROR)
            and Stream.objects.filter(workflow_id=wid).update(
                closed_at=timezone.now(), closed_by_end=True
            )
        )
    )()
    # Resumed, then failed: a second interruption.
    assert await asyncio.wait_for(pending, 5) == ds_feed.Interrupted(1, "ERROR")
    await events.aclose()


def test_the_admin_shows_an_interrupted_stream(admin_client: Client) -> None:
    def make(status: str) -> Workflow:
        workflow = Workflow.objects.create(
            name="tests.any", status=status, inputs="{}", max_attempts=1
        )
        now = timezone.now()
        Stream.objects.create(
            workflow=workflow, key="cut", length=0, closed_at=now, closed_by_end=True
        )
        Stream.objects.create(workflow=workflow, key="done", length=0, closed_at=now)
        return workflow

    cancelled = make(Status.CANCELLED)
    page = admin_client.get(f"/admin/durable_streams/workflow/{cancelled.pk}/change/")
    html = page.content.decode()
    cut, done = html.index('data-key="cut"'), html.index('data-key="done"')
    assert "ds-badge-interrupted" in html[cut:done] and "ds-badge-closed" not in html[cut:done]
    # The live tail follows an interrupted stream: a resume may write on.
    assert 'data-open="true"' in html[cut:done]
    assert "ds-badge-closed" in html[done:] and 'data-open="false"' in html[done:]
    stream = Stream.objects.get(workflow=cancelled, key="cut")
    detail = admin_client.get(
        f"/admin/durable_streams/workflow/{cancelled.pk}/streams/{stream.pk}/"
    ).content.decode()
    assert "ds-badge-interrupted" in detail and "ds-badge-closed" not in detail
    succeeded = make(Status.SUCCESS)
    html = admin_client.get(f"/admin/durable_streams/workflow/{succeeded.pk}/change/")
    assert "ds-badge-interrupted" not in html.content.decode()


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="push needs a shared layer (REDIS_URL)")
async def test_a_resume_wakes_the_feeds_of_an_interrupted_stream_at_once(
    settings: Any, db: None
) -> None:
    # Pushed, and silences so long that only a message can make the feed read again.
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "NOTIFY_FALLBACK_POLL": 600.0}

    def setup() -> str:
        workflow = Workflow.objects.create(
            name="tests.any", status=Status.CANCELLED, inputs="{}", max_attempts=1
        )
        Stream.objects.create(
            workflow=workflow, key="out", length=0, closed_at=timezone.now(), closed_by_end=True
        )
        return workflow.pk

    wid = await sync_to_async(setup)()
    feed = ds_feed.StreamFeed(wid, "out", 0)
    assert feed.pushed
    events = feed.events()
    assert await anext(events) == ds_feed.Interrupted(0, "CANCELLED")
    pending = asyncio.ensure_future(anext(events))
    fetches = feed.fetches
    await asyncio.sleep(0.3)
    assert feed.fetches == fetches  # waiting, not polling
    await sync_to_async(resume)(wid)
    deadline = time.monotonic() + 5
    while feed.fetches == fetches:  # the resume's message made it read the database
        assert time.monotonic() < deadline, "the resume did not wake the feed"
        await asyncio.sleep(0.01)
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    await events.aclose()
