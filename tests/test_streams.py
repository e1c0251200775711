"""Streams: keys, dense offsets, exact round trips, errors, closing, and readers."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from durable_streams import (
    Status,
    StreamTimeout,
    WorkflowNotFound,
    WorkflowTimeout,
    aread_stream,
    close_stream,
    read_stream,
    write_stream,
)
from durable_streams.bus import watched_topics
from durable_streams.exceptions import NotInWorkflow, WorkflowCancelled, WorkflowFailed
from durable_streams.models import Step, Stream, StreamEntry, Workflow
from durable_streams.worker import Worker
from tests import workflows
from tests.models import Effect
from tests.stored import stream_entries as entries
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def stored_stream(length: int, *, closed: bool = True) -> str:
    """A finished workflow whose stream ``out`` holds 0..length-1, stored directly."""
    run = Workflow.objects.create(
        name="tests.workflows.write_values",
        inputs='{"args":[],"kwargs":{}}',
        max_attempts=1,
        status=Status.SUCCESS if closed else Status.RUNNING,
        lease_owner=None if closed else "elsewhere",
        lease_expires_at=None if closed else "2999-01-01T00:00:00Z",
    )
    stream = Stream.objects.create(
        workflow=run, key="out", length=length, closed_at="2000-01-01T00:00:00Z" if closed else None
    )
    StreamEntry.objects.bulk_create(
        [StreamEntry(stream=stream, offset=i, value=str(i)) for i in range(length)],
        batch_size=500,
    )
    return run.pk


# Writing


def test_several_keys_with_dense_offsets_in_write_order(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.write_many_keys.start(["a", "b", "c"], 20)
    run_burst()
    handle.result(timeout=5)
    for key in ["a", "b", "c"]:
        assert entries(handle.workflow_id, key) == [(i, f"{key}-{i}") for i in range(20)]
        stream = Stream.objects.get(workflow_id=handle.workflow_id, key=key)
        assert stream.length == 20
        assert list(read_stream(handle.workflow_id, key, timeout=5)) == [
            f"{key}-{i}" for i in range(20)
        ]


ROUND_TRIP: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    10**30,
    0.1,
    1 / 3,
    -0.0,
    5e-324,
    1.7976931348623157e308,
    "",
    "unicode ✓ 日本語 🎉",
    "\u0000",
    "a\u0000b",
    "\ud800",
    "lone \udfff and \ud83d",
    "__DBOS_STREAM_CLOSED__",
    "\\ \" ' \n\t\r \u2028\u2029 \ufeff",
    "x" * 300_000,
    [],
    {},
    {"nested": [1, {"deeper": [None, 2.5, "s"]}], "": [[]], "✓": {"k": False}},
]


def test_every_json_value_round_trips_exactly(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.write_values.start("out", ROUND_TRIP)
    run_burst()
    assert handle.result(timeout=5) == len(ROUND_TRIP)
    read = list(read_stream(handle.workflow_id, "out", timeout=5))
    # repr tells apart what == does not: -0.0 and 0.0, True and 1.
    assert [repr(v) for v in read] == [repr(v) for v in ROUND_TRIP]
    assert math.copysign(1, read[9]) == -1
    assert [offset for offset, _ in entries(handle.workflow_id, "out")] == list(
        range(len(ROUND_TRIP))
    )


@pytest.mark.parametrize(
    ("kind", "type_name"),
    [
        ("object", "object"),
        ("nan", "float"),
        ("set", "set"),
        ("circular", "list"),
        ("bad_dict_key", "tuple"),
    ],
)
def test_a_value_that_cannot_be_encoded_raises_type_error_and_writes_nothing(
    run_burst: Callable[..., Worker], kind: str, type_name: str
) -> None:
    handle = workflows.probe_writes.start(
        [
            {"key": "k", "value": 1},
            {"key": "k", "unencodable": kind},
            {"key": "k", "value": 2},
        ]
    )
    run_burst()
    ok, error, ok_again = handle.result(timeout=5)
    assert (ok, ok_again) == ("ok", "ok")
    assert error.startswith("TypeError: A value written to stream 'k' must be JSON-serializable")
    assert f"a value of type {type_name} is not" in error
    # No gap where the refused value would have gone.
    assert entries(handle.workflow_id, "k") == [(0, 1), (1, 2)]


def test_a_value_nested_too_deeply_raises_value_error_naming_the_key(
    run_burst: Callable[..., Worker],
) -> None:
    # A bare RecursionError before, naming neither the stream nor the value.
    handle = workflows.probe_writes.start(
        [{"key": "k", "value": 1}, {"key": "k", "unencodable": "deep"}, {"key": "k", "value": 2}]
    )
    run_burst()
    ok, error, ok_again = handle.result(timeout=5)
    assert (ok, ok_again) == ("ok", "ok")
    assert error.startswith("ValueError: A value written to stream 'k' is nested too deeply")
    assert entries(handle.workflow_id, "k") == [(0, 1), (1, 2)]


def test_a_value_over_max_value_bytes_raises_value_error_and_writes_nothing(
    run_burst: Callable[..., Worker],
) -> None:
    limit = 64
    cases = [
        {"key": "k", "value": "x" * (limit - 2)},  # with its quotes: exactly the limit
        {"key": "k", "value": "x" * (limit - 1)},
        {"key": "k", "value": "é" * (limit // 2 - 1)},  # two bytes each in UTF-8
        {"key": "k", "value": "é" * (limit // 2)},
    ]
    with override_settings(DURABLE_STREAMS={**settings.DURABLE_STREAMS, "MAX_VALUE_BYTES": limit}):
        handle = workflows.probe_writes.start(cases)
        run_burst()
    outcomes = handle.result(timeout=5)
    assert outcomes[0] == outcomes[2] == "ok"
    for outcome, size in [(outcomes[1], limit + 1), (outcomes[3], limit + 2)]:
        assert outcome.startswith("ValueError: A value written to stream 'k'")
        assert f"is {size} bytes once encoded; the limit is {limit}" in outcome
        assert "MAX_VALUE_BYTES" in outcome
    assert entries(handle.workflow_id, "k") == [(0, "x" * (limit - 2)), (1, "é" * (limit // 2 - 1))]


def test_bad_keys_raise_clear_errors(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.probe_writes.start(
        [
            {"key": "", "value": 1},
            {"key": 5, "value": 1},
            {"key": None, "value": 1},
            {"key": "k" * 256, "value": 1},
            {"key": "a\x00b", "value": 1},
            {"key": "\ud800", "value": 1},
            {"key": "", "close": True},
            {"key": "k" * 255, "value": "longest key"},
        ]
    )
    run_burst()
    outcomes = handle.result(timeout=5)
    assert outcomes == [
        "ValueError: A stream key must not be empty.",
        "TypeError: A stream key must be a str, not int.",
        "TypeError: A stream key must be a str, not NoneType.",
        f"ValueError: A stream key must be at most 255 characters; {'k' * 20!r}... has 256.",
        "ValueError: A stream key must not contain NUL characters: 'a\\x00b'.",
        "ValueError: A stream key must be valid Unicode text without lone surrogates: '\\ud800'.",
        "ValueError: A stream key must not be empty.",
        "ok",
    ]
    assert list(Stream.objects.values_list("key", flat=True)) == ["k" * 255]


def test_close_twice_is_harmless_and_write_after_close_raises(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.write_after_close.start()
    run_burst()
    message = handle.result(timeout=5)
    assert message == f"Stream 'out' of workflow {handle.workflow_id!r} is closed."
    assert entries(handle.workflow_id, "out") == [(0, 1)]
    stream = Stream.objects.get(workflow_id=handle.workflow_id, key="out")
    assert stream.is_closed and not stream.closed_by_end
    assert stream.close_operation == 1
    assert list(read_stream(handle.workflow_id, "out", timeout=5)) == [1]


def test_a_stream_closed_without_values_is_empty_and_closed(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.probe_writes.start(
        [{"key": "empty", "close": True}, {"key": "empty", "value": 1}]
    )
    run_burst()
    assert handle.result(timeout=5) == [
        "ok",
        f"StreamClosed: Stream 'empty' of workflow {handle.workflow_id!r} is closed.",
    ]
    stream = Stream.objects.get(workflow_id=handle.workflow_id, key="empty")
    assert (stream.length, stream.is_closed) == (0, True)
    assert list(read_stream(handle.workflow_id, "empty", timeout=5)) == []


def test_the_end_of_a_workflow_closes_its_open_streams(run_burst: Callable[..., Worker]) -> None:
    succeeded = workflows.write_values.start("out", [1, 2], close=False)
    failed = workflows.fails.start("boom")
    run_burst()
    assert succeeded.status == Status.SUCCESS and failed.status == Status.ERROR
    for handle in [succeeded, failed]:
        stream = Stream.objects.get(workflow_id=handle.workflow_id, key="out")
        assert stream.is_closed and stream.closed_by_end
    assert list(read_stream(succeeded.workflow_id, "out", timeout=5)) == [1, 2]
    # The failure interrupted the stream: not a final close (a resume reopens it).
    read: list[Any] = []
    with pytest.raises(WorkflowFailed) as failure:
        read.extend(read_stream(failed.workflow_id, "out", timeout=5))
    assert read == ["before"]
    assert (failure.value.key, failure.value.length, failure.value.error_type) == (
        "out",
        1,
        "ValueError",
    )


def test_cancel_closes_the_streams_and_readers_end(worker_thread: Callable[..., Worker]) -> None:
    handle = workflows.cancellable.start("cancel-streams", 100, 0.1)
    worker_thread()
    reader = read_stream(handle.workflow_id, "progress", timeout=10)
    assert [next(reader), next(reader)] == [0, 1]
    assert handle.cancel()
    stream = Stream.objects.get(workflow_id=handle.workflow_id, key="progress")
    assert stream.is_closed and stream.closed_by_end
    rest: list[int] = []
    with pytest.raises(WorkflowCancelled) as cancelled:  # where it would otherwise wait
        rest.extend(reader)
    assert rest == list(range(2, 2 + len(rest)))
    assert len(rest) <= 2
    assert (cancelled.value.key, cancelled.value.length) == ("progress", 2 + len(rest))


def test_write_and_close_outside_a_workflow_raise_not_in_workflow() -> None:
    with pytest.raises(NotInWorkflow, match=r"write_stream\(\) can only be called from a workflow"):
        write_stream("k", 1)
    with pytest.raises(NotInWorkflow, match=r"close_stream\(\)"):
        close_stream("k")
    with pytest.raises(RuntimeError):
        write_stream("k", 1)
    assert not Stream.objects.exists()


def test_writes_from_a_step_are_visible_before_the_step_ends(
    worker_thread: Callable[..., Worker],
) -> None:
    handle = workflows.step_streams_live.start("live")
    worker_thread()
    reader = read_stream(handle.workflow_id, "tokens", timeout=10)
    assert next(reader) == "first"
    # The step is still running: nothing is checkpointed yet.
    assert not Step.objects.filter(workflow_id=handle.workflow_id).exists()
    assert handle.status == Status.RUNNING
    Effect.objects.create(label="live-release")
    assert list(reader) == ["second"]
    assert handle.result(timeout=10) == "done"
    assert Step.objects.get(workflow_id=handle.workflow_id).status == Step.Outcome.SUCCESS


def test_a_retried_step_writes_its_values_again(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.step_writer.start("retried")
    run_burst()
    handle.result(timeout=5)
    # At least once, like the step: each attempt's values, in order, no gap.
    assert entries(handle.workflow_id, "tokens") == [(0, "a"), (1, "b"), (2, "a"), (3, "b")]
    assert Step.objects.get(workflow_id=handle.workflow_id).attempts == 2


# Reading


def test_read_from_an_offset(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.write_values.start("out", list(range(10)))
    run_burst()
    wid = handle.workflow_id
    assert list(read_stream(wid, "out", offset=4, timeout=5)) == [4, 5, 6, 7, 8, 9]
    assert list(read_stream(wid, "out", offset=9, timeout=5)) == [9]
    assert list(read_stream(wid, "out", offset=10, timeout=5)) == []
    assert list(read_stream(wid, "out", offset=50, timeout=5)) == []
    # A stream the finished workflow never wrote has nothing, and ends.
    assert list(read_stream(wid, "never-written", timeout=5)) == []


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"offset": -1}, ValueError, "offset must be a whole number of at least 0"),
        ({"offset": True}, ValueError, "offset"),
        ({"offset": 1.5}, ValueError, "offset"),
        ({"timeout": -1}, ValueError, "timeout must be None or a number of seconds"),
        ({"timeout": "1"}, ValueError, "timeout"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"timeout": float("inf")}, ValueError, "timeout"),
        ({"key": ""}, ValueError, "must not be empty"),
        ({"key": 3}, TypeError, "must be a str, not int"),
    ],
)
def test_bad_read_arguments_raise_at_the_call(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    key = options.pop("key", "out")
    with pytest.raises(error, match=message):
        read_stream("any", key, **options)


def test_read_waits_while_open_and_ends_after_the_last_value(
    worker_thread: Callable[..., Worker],
) -> None:
    handle = workflows.steady.start(5, 0.05)
    # The reader starts before the workflow has written (or even started).
    reader = read_stream(handle.workflow_id, "out", timeout=10)
    worker_thread()
    assert list(reader) == [0, 1, 2, 3, 4]
    assert handle.result(timeout=10) == 5


def test_read_of_an_unknown_workflow_raises_workflow_not_found() -> None:
    with pytest.raises(WorkflowNotFound, match="'missing'"):
        list(read_stream("missing", "out", timeout=1))


def test_read_times_out_when_the_next_value_does_not_come(
    worker_thread: Callable[..., Worker],
) -> None:
    enqueued = workflows.echo.start()
    started = time.monotonic()
    with pytest.raises(StreamTimeout) as info:
        next(read_stream(enqueued.workflow_id, "out", timeout=0.3))
    assert 0.3 <= time.monotonic() - started < 3
    error = info.value
    assert (error.workflow_id, error.key, error.offset, error.timeout) == (
        enqueued.workflow_id,
        "out",
        0,
        0.3,
    )
    assert isinstance(error, TimeoutError)

    handle = workflows.step_streams_live.start("timeout")
    worker_thread()
    reader = read_stream(handle.workflow_id, "tokens", timeout=0.5)
    assert next(reader) == "first"
    with pytest.raises(StreamTimeout, match="No value at offset 1 of stream 'tokens'"):
        next(reader)
    Effect.objects.create(label="timeout-release")
    assert handle.result(timeout=10) == "done"


def test_the_timeout_counts_from_when_the_reader_waits(transactional_db: None) -> None:
    enqueued = workflows.echo.start()
    reader = read_stream(enqueued.workflow_id, "out", timeout=0.3)
    time.sleep(0.4)  # a reader created, then iterated a little later (the point of the test)
    started = time.monotonic()
    with pytest.raises(StreamTimeout):
        next(reader)
    assert time.monotonic() - started >= 0.25


def test_the_timeout_restarts_with_every_value(worker_thread: Callable[..., Worker]) -> None:
    # Six values 0.25s apart take longer than the timeout, each gap much less.
    handle = workflows.steady.start(6, 0.25)
    worker_thread()
    started = time.monotonic()
    assert list(read_stream(handle.workflow_id, "out", timeout=1.2)) == list(range(6))
    assert time.monotonic() - started > 1.2


def test_catching_up_reads_in_batches(django_assert_max_num_queries: Any) -> None:
    wid = stored_stream(2000)
    with django_assert_max_num_queries(12):
        values = list(read_stream(wid, "out", timeout=5))
    assert values == list(range(2000))

    smaller_batches = {**settings.DURABLE_STREAMS, "READ_BATCH_SIZE": 100}
    with (
        override_settings(DURABLE_STREAMS=smaller_batches),
        CaptureQueriesContext(connection) as queries,
    ):
        values = list(read_stream(wid, "out", offset=1500, timeout=5))
    assert values == list(range(1500, 2000))
    entry_queries = [q for q in queries.captured_queries if "streamentry" in q["sql"].lower()]
    assert len(entry_queries) == 5
    assert len(queries) <= 12


def test_a_reader_of_an_open_stream_sees_values_appear(
    worker_thread: Callable[..., Worker],
) -> None:
    handle = workflows.step_streams_live.start("appear")
    got: list[Any] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            got.extend(read_stream(handle.workflow_id, "tokens", timeout=10))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    reader = threading.Thread(target=read)
    reader.start()
    worker_thread()
    wait_until(lambda: got == ["first"], timeout=10, what="the first value")
    Effect.objects.create(label="appear-release")
    reader.join(timeout=10)
    assert not reader.is_alive() and not errors
    assert got == ["first", "second"]


def test_a_reader_is_woken_once_per_value(
    worker_thread: Callable[..., Worker],
) -> None:
    count = 6
    handle = workflows.cancellable.start("woken", count, 0.1)
    worker_thread()
    # No poll while the test reads: only the writes' doorbells wake the reader.
    config = {**settings.DURABLE_STREAMS, "POLL_INTERVAL": 30.0, "NOTIFY_FALLBACK_POLL": 30.0}
    with override_settings(DURABLE_STREAMS=config):
        reader = read_stream(handle.workflow_id, "progress", timeout=10)
        assert next(reader) == 0
        got = [0]
        with CaptureQueriesContext(connection) as queries:
            got.extend(reader)
    assert got == list(range(count))
    # One wake per value (its read, then the row's after the short batch), one for
    # the end and one after the first value. A process that heard its own
    # notification again, besides ringing its waiters at commit, would wake twice.
    assert len(queries) <= 2 * (count - 1) + 4


def test_readers_and_waiters_leave_nothing_subscribed(run_burst: Callable[..., Worker]) -> None:
    baseline = watched_topics()
    done = workflows.write_values.start("out", [1, 2])
    waiting = workflows.echo.using(queue="nobody").start()
    run_burst()
    assert list(read_stream(done.workflow_id, "out", timeout=5)) == [1, 2]
    assert done.result(timeout=5) == 2
    with pytest.raises(StreamTimeout):
        next(read_stream(waiting.workflow_id, "out", timeout=0.1))
    with pytest.raises(WorkflowTimeout):
        waiting.result(timeout=0.1)
    abandoned = read_stream(done.workflow_id, "out", timeout=5)
    assert next(abandoned) == 1
    assert watched_topics() > baseline  # it waits on its stream's topics
    abandoned.close()
    assert watched_topics() == baseline


# Async reading


async def test_aread_stream_works_the_same_from_async_code(
    async_db: None, worker_thread: Callable[..., Worker]
) -> None:
    wid = await sync_to_async(stored_stream)(1200)
    assert [v async for v in aread_stream(wid, "out", timeout=5)] == list(range(1200))
    assert [v async for v in aread_stream(wid, "out", offset=1195, timeout=5)] == list(
        range(1195, 1200)
    )

    with pytest.raises(WorkflowNotFound):
        async for _ in aread_stream("missing", "out", timeout=1):
            pass

    handle = await sync_to_async(workflows.steady.start)(4, 0.05)
    await sync_to_async(worker_thread)()
    assert [v async for v in aread_stream(handle.workflow_id, "out", timeout=10)] == [0, 1, 2, 3]

    waiting = await sync_to_async(workflows.echo.using(queue="nobody").start)()
    with pytest.raises(StreamTimeout):
        async for _ in aread_stream(waiting.workflow_id, "out", timeout=0.2):
            pass


def test_a_stream_position_and_its_values_take_one_query_each() -> None:
    def one_query(call: Callable[[], Any]) -> Any:
        with CaptureQueriesContext(connection) as queries:
            result = call()
        assert len(queries) == 1, queries.captured_queries
        # Logged with its text, as Django logs its own queries, on every database.
        assert "durable_streams_" in queries.captured_queries[0]["sql"]
        return result

    assert one_query(lambda: Stream.objects.position("no-such-workflow", "out")) is None
    wid = workflows.echo.start().workflow_id
    # No row before the first write: empty, and open while the workflow is active.
    assert one_query(lambda: Stream.objects.position(wid, "out")) == (None, 0, False, None)
    now = timezone.now()
    stream = Stream.objects.create(workflow_id=wid, key="out", length=3, created_at=now)
    StreamEntry.objects.bulk_create(
        StreamEntry(stream=stream, offset=i, value=f'{{"i": {i}}}', created_at=now)
        for i in range(3)
    )
    assert one_query(lambda: Stream.objects.position(wid, "out")) == (stream.pk, 3, False, None)
    assert one_query(lambda: StreamEntry.objects.texts_from(stream.pk, 1, 5)) == [
        (1, '{"i": 1}'),
        (2, '{"i": 2}'),
    ]
    assert StreamEntry.objects.texts_from(stream.pk, 0, 1) == [(0, '{"i": 0}')]
    assert StreamEntry.objects.texts_from(stream.pk, 3, 5) == []
    Stream.objects.filter(pk=stream.pk).update(closed_at=now)
    assert Stream.objects.position(wid, "out") == (stream.pk, 3, True, None)
    # Once the workflow has ended, so has every stream of it, written to or not.
    Workflow.objects.filter(pk=wid).update(status=Status.SUCCESS)
    assert Stream.objects.position(wid, "never written") == (None, 0, True, None)
