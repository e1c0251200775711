"""Group commit: one batch for many workflows and workers, stored as one unit and fenced."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from durable_streams import Status
from durable_streams.encoding import dumps
from durable_streams.exceptions import LeaseLost
from durable_streams.models import Step, Stream, StreamEntry, Workflow
from durable_streams.runtime import writer
from durable_streams.runtime.execution import Execution, _StreamState

pytestmark = pytest.mark.django_db(transaction=True)


def running(workflow_id: str, worker_id: str) -> Execution:
    Workflow.objects.create(
        id=workflow_id,
        name="tests.batch",
        inputs=dumps({"args": [], "kwargs": {}}),
        max_attempts=3,
        status=Status.RUNNING,
        lease_owner=worker_id,
        lease_expires_at=timezone.now() + timedelta(seconds=1),
    )
    return Execution(workflow_id, worker_id, connection.alias)


def checkpoint(workflow_id: str, operation: int) -> Step:
    now = timezone.now()
    return Step(
        workflow_id=workflow_id,
        operation=operation,
        name=f"s{operation}",
        status=Step.Outcome.SUCCESS,
        output='{"out": 1}',
        attempts=2,
        started_at=now,
        finished_at=now,
    )


def rows(workflow_id: str) -> dict[str, tuple[int, bool, int | None, list[tuple[int, str]]]]:
    found = {}
    for stream in Stream.objects.filter(workflow_id=workflow_id):
        entries = StreamEntry.objects.filter(stream=stream).order_by("offset")
        found[stream.key] = (
            stream.length,
            stream.is_closed,
            stream.close_operation,
            [(e.offset, e.value) for e in entries],
        )
    return found


def test_one_batch_stores_many_workflows_of_many_workers_and_fences_each() -> None:
    first = running("wf-a", "worker-1")
    second = running("wf-b", "worker-2")
    usurped = running("wf-c", "worker-1")
    Workflow.objects.filter(pk="wf-c").update(lease_owner="worker-3")
    # wf-b already has a stream with two values.
    existing = Stream.objects.create(workflow_id="wf-b", key="old", length=2)
    StreamEntry.objects.bulk_create(
        [StreamEntry(stream=existing, offset=i, value=str(i)) for i in range(2)]
    )
    second.streams["old"] = _StreamState(existing.pk, 2, False)
    W = writer.PendingWrite
    batch = {
        first: [
            W("x", '"a0"', 0, 0),
            W("y", "null", None, 0),
            W("x", '{"k": [1]}', 2, 1),
            W("x", None, 3, 2),  # closed with its two values
            W("empty", None, 4, 0),  # closed without any
        ],
        second: [W("old", "2", None, 2), W("old", "3", 1, 3)],
        usurped: [W("lost", '"never"', 0, 0), writer.PendingCheckpoint(checkpoint("wf-c", 1))],
    }
    batch[first].insert(2, writer.PendingCheckpoint(checkpoint("wf-a", 1)))
    leases = dict(Workflow.objects.values_list("pk", "lease_expires_at"))

    stored = writer._store_batch(connection.alias, batch)

    assert set(stored.failures) == {usurped}
    assert isinstance(stored.failures[usurped], LeaseLost)
    assert rows("wf-a") == {
        "x": (2, True, 3, [(0, '"a0"'), (1, '{"k": [1]}')]),
        "y": (1, False, None, [(0, "null")]),
        "empty": (0, True, 4, []),
    }
    assert rows("wf-b") == {"old": (4, False, None, [(0, "0"), (1, "1"), (2, "2"), (3, "3")])}
    assert rows("wf-c") == {}
    # The checkpoint of the held workflow is stored, and its lease renewed; only that.
    steps = Step.objects.values_list("workflow_id", "operation", "name", "output", "attempts")
    assert list(steps) == [("wf-a", 1, "s1", '{"out": 1}', 2)]
    renewed = dict(Workflow.objects.values_list("pk", "lease_expires_at"))
    assert renewed["wf-a"] > leases["wf-a"]
    assert (renewed["wf-b"], renewed["wf-c"]) == (leases["wf-b"], leases["wf-c"])
    operations = StreamEntry.objects.filter(stream__workflow_id="wf-a").values_list(
        "stream__key", "offset", "operation"
    )
    assert sorted(operations) == [("x", 0, 0), ("x", 1, 2), ("y", 0, None)]
    # The new streams' ids come back for the next batches.
    created = {(e.workflow_id, key): stream_id for e, key, stream_id in stored.created}
    assert created == {
        ("wf-a", key): Stream.objects.get(workflow_id="wf-a", key=key).pk
        for key in ("x", "y", "empty")
    }
    # Live delivery: values first per stream run, closes with their lengths.
    hooks = sorted(stored.hooks, key=lambda h: (h[0], h[1], h[4] is not None))
    assert hooks == [
        ("wf-a", "empty", 0, [], 0),
        ("wf-a", "x", 0, ['"a0"', '{"k": [1]}'], None),
        ("wf-a", "x", 2, [], 2),
        ("wf-a", "y", 0, ["null"], None),
        ("wf-b", "old", 2, ["2", "3"], None),
    ]


def test_a_batch_that_breaks_a_constraint_stores_nothing_at_all() -> None:
    first = running("wf-d", "worker-1")
    second = running("wf-e", "worker-1")
    stream = Stream.objects.create(workflow_id="wf-e", key="s", length=1)
    StreamEntry.objects.create(stream=stream, offset=0, value="0")
    second.streams["s"] = _StreamState(stream.pk, 1, False)
    W = writer.PendingWrite
    batch = {first: [W("fine", "1", None, 0)], second: [W("s", "dup", None, 0)]}

    with pytest.raises(Exception, match="(?i)unique"):
        writer._store_batch(connection.alias, batch)

    assert rows("wf-d") == {}
    assert rows("wf-e") == {"s": (1, False, None, [(0, "0")])}
