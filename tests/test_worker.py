"""The worker, in threads: burst, concurrency, queues, cancel, leases, fencing, max_attempts."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import OperationalError, connection
from django.test import override_settings
from django.utils import timezone

from durable_streams import Status, WorkflowCancelled, start_workflow
from durable_streams.models import NO_CHANGES, Changes, Step, Stream, StreamEntry, Workflow
from durable_streams.runtime import writer
from durable_streams.runtime.registry import names
from durable_streams.worker import Worker
from tests import workflows
from tests.models import Effect
from tests.stored import stream_length, stream_values
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def effect_labels(workflow_id: str) -> list[str]:
    return sorted(Effect.objects.filter(workflow_id=workflow_id).values_list("label", flat=True))


def idle(worker: Worker) -> bool:
    return not worker._running


def claimed_ids(worker: Worker, limit: int) -> list[str]:
    return [claim.workflow_id for claim in worker._claim(limit, names())]


def expire_lease(workflow_id: str) -> None:
    Workflow.objects.filter(pk=workflow_id).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


# Burst and concurrency


def test_burst_mode_runs_what_is_there_then_exits(transactional_db: None) -> None:
    handles = [workflows.echo.start(i) for i in range(3)]
    worker = Worker(burst=True, concurrency=2)
    thread = threading.Thread(target=worker.run)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert worker.completed == 3
    assert [h.result() for h in handles] == [{"args": [i], "kwargs": {}} for i in range(3)]


def test_burst_mode_exits_at_once_when_there_is_nothing(run_burst: Callable[..., Worker]) -> None:
    started = time.monotonic()
    assert run_burst().completed == 0
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_bounds_the_workflows_run_at_once(
    run_burst: Callable[..., Worker], concurrency: int
) -> None:
    handles = [workflows.slow_then_write.start(0.3) for _ in range(4)]
    run_burst(concurrency=concurrency)
    runs = Workflow.objects.filter(pk__in=[h.workflow_id for h in handles])
    assert {run.status for run in runs} == {Status.SUCCESS}
    events = sorted(
        [(run.started_at, 1) for run in runs] + [(run.finished_at, -1) for run in runs],
        key=lambda event: (event[0], event[1]),
    )
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == concurrency


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be a whole number of at least 1"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": "2"}, "concurrency"),
        ({"queues": []}, "at least one queue"),
    ],
)
def test_bad_worker_arguments(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Worker(**options)


# Queues


def test_a_worker_only_takes_its_queues(run_burst: Callable[..., Worker]) -> None:
    other = workflows.on_other_queue.start()
    special = start_workflow(workflows.echo, "special", queue="special")
    default = workflows.echo.start("default")
    run_burst()
    assert (default.status, other.status, special.status) == (
        Status.SUCCESS,
        Status.ENQUEUED,
        Status.ENQUEUED,
    )
    run_burst(queues=["special"])
    assert (other.status, special.status) == (Status.ENQUEUED, Status.SUCCESS)
    run_burst(queues=["nothing-here", "other"])
    assert other.result(timeout=5) == "other"


def test_a_worker_only_takes_workflows_registered_in_its_process(
    run_burst: Callable[..., Worker],
) -> None:
    unknown = Workflow.objects.create(name="elsewhere.only", inputs="{}", max_attempts=1)
    assert "elsewhere.only" not in names()
    run_burst()
    unknown.refresh_from_db()
    assert (unknown.status, unknown.attempts) == (Status.ENQUEUED, 0)


# Cancel


def test_cancel_stops_a_running_workflow_at_its_next_step_boundary(
    worker_thread: Callable[..., Worker],
) -> None:
    handle = workflows.cancellable.start("cancel", 50, 0.5)
    wid = handle.workflow_id
    worker = worker_thread()
    # Value 1 is written after step cancel-1 and before the pause: the cancel lands in it.
    wait_until(lambda: stream_length(wid, "progress") >= 2, timeout=10, what="two values")
    assert handle.cancel() is True
    wait_until(lambda: idle(worker), timeout=10, what="the worker to let the workflow go")

    assert effect_labels(wid) == ["cancel-0", "cancel-1"]
    # The pause in flight finished but could not be checkpointed; nothing ran after it.
    assert list(Step.objects.filter(workflow_id=wid).values_list("name", flat=True)) == [
        "tests.workflows.counted_plain",
        "tests.workflows.nap",
        "tests.workflows.counted_plain",
    ]
    assert stream_values(wid, "progress") == [0, 1]
    run = handle.get()
    assert (run.status, run.lease_owner, run.output, run.error) == (
        Status.CANCELLED,
        None,
        None,
        None,
    )
    assert Stream.objects.get(workflow_id=wid, key="progress").closed_by_end
    with pytest.raises(WorkflowCancelled):
        handle.result(timeout=1)


# Leases


def step_record(wid: str, operation: int, **fields: Any) -> Step:
    """An unsaved successful step of ``wid``; ``fields`` override its values."""
    now = timezone.now()
    values = {"name": "s", "status": Step.Outcome.SUCCESS, "output": "1", "attempts": 1}
    return Step(
        workflow_id=wid,
        operation=operation,
        started_at=now,
        finished_at=now,
        **{**values, **fields},
    )


def test_a_workflow_whose_lease_expired_is_reclaimed_and_replayed(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.replayable.start("reclaimed")
    wid = handle.workflow_id
    now = timezone.now()
    Workflow.objects.filter(pk=wid).update(
        status=Status.RUNNING,
        attempts=1,
        lease_owner="dead-worker",
        lease_expires_at=now - timedelta(seconds=1),
        started_at=now - timedelta(seconds=5),
    )
    step_record(
        wid, 0, name="tests.workflows.counted_plain", output='"done by the dead worker"'
    ).save()
    held = workflows.echo.start()  # held by a live worker elsewhere: left alone
    Workflow.objects.filter(pk=held.workflow_id).update(
        status=Status.RUNNING,
        attempts=1,
        lease_owner="live-worker-elsewhere",
        lease_expires_at=now + timedelta(minutes=5),
    )

    run_burst(worker_id="rescuer")
    assert handle.result(timeout=5) == ["done by the dead worker", "a"]
    run = handle.get()
    assert (run.attempts, run.started_at) == (2, now - timedelta(seconds=5))
    assert not Effect.objects.filter(label="reclaimed").exists()
    other = held.get()
    assert (other.status, other.lease_owner, other.attempts) == (
        Status.RUNNING,
        "live-worker-elsewhere",
        1,
    )


def test_another_worker_takes_over_once_a_short_lease_expires(
    worker_thread: Callable[..., Worker],
) -> None:
    with override_settings(DURABLE_STREAMS={**settings.DURABLE_STREAMS, "LEASE_SECONDS": 1.0}):
        handle = workflows.echo.start("taken over")
        # A worker claims it and dies at once: it never runs it, nor renews the lease.
        claimed_at = time.monotonic()
        assert claimed_ids(Worker(worker_id="dies-after-claiming"), 1) == [handle.workflow_id]
        assert handle.get().lease_owner == "dies-after-claiming"
        worker_thread(worker_id="survivor")
        assert handle.result(timeout=10) == {"args": ["taken over"], "kwargs": {}}
        waited = time.monotonic() - claimed_at
    assert 0.9 <= waited < 8
    assert handle.get().attempts == 2


def test_a_worker_that_lost_its_lease_records_nothing_more(
    worker_thread: Callable[..., Worker],
) -> None:
    handle = workflows.cancellable.start("fenced", 4, 0.5)
    wid = handle.workflow_id
    first = worker_thread(worker_id="first")
    wait_until(lambda: stream_length(wid, "progress") >= 2, timeout=10, what="two values")
    # Another worker takes the workflow over while the first one pauses.
    Workflow.objects.filter(pk=wid).update(
        lease_owner="usurper", lease_expires_at=timezone.now() + timedelta(minutes=5)
    )
    wait_until(lambda: idle(first), timeout=10, what="the first worker to stop")
    assert effect_labels(wid) == ["fenced-0", "fenced-1"]
    assert Step.objects.filter(workflow_id=wid).count() == 3
    assert stream_values(wid, "progress") == [0, 1]
    assert handle.get().lease_owner == "usurper"  # the first worker did not touch it

    # The usurper dies; a third worker resumes from the checkpoints.
    expire_lease(wid)
    worker_thread(worker_id="third")
    assert handle.result(timeout=20) == 4
    assert effect_labels(wid) == [f"fenced-{i}" for i in range(4)]
    assert stream_values(wid, "progress") == [0, 1, 2, 3]


def held_workflow(label: str, lease_expires_at: Any = None) -> str:
    """A workflow that the worker "holder" holds, as if it had claimed it."""
    wid = workflows.cancellable.start(label, 1, 0).workflow_id
    Workflow.objects.filter(pk=wid).update(
        status=Status.RUNNING,
        lease_owner="holder",
        lease_expires_at=lease_expires_at or timezone.now() + timedelta(minutes=1),
    )
    return wid


def checkpoint(
    wid: str, operation: int, worker_id: str = "holder", until: Any = None, **fields: Any
) -> bool:
    step = step_record(wid, operation, **fields)
    return Step.objects.checkpoint(step, worker_id, until or timezone.now() + timedelta(minutes=1))


def test_a_claim_says_which_runs_have_a_history_to_replay() -> None:
    now = timezone.now()
    fresh = workflows.echo.start("fresh").workflow_id
    with_steps = workflows.echo.start("released after a step").workflow_id
    step_record(with_steps, 0).save()
    with_stream = workflows.echo.start("released after a write").workflow_id
    Stream.objects.create(workflow_id=with_stream, key="out", created_at=now)
    reclaimed = workflows.echo.start("reclaimed").workflow_id
    Workflow.objects.filter(pk=reclaimed).update(
        status=Status.RUNNING, attempts=1, lease_owner="dead", lease_expires_at=now
    )
    claims = Workflow.objects.claim(
        "claimer", ["default"], names(), 10, lease_until=now + timedelta(minutes=1)
    )
    assert {claim.workflow_id: claim.has_history for claim in claims} == {
        fresh: False,
        with_steps: True,
        with_stream: True,
        # Always replayed: its last holder may have committed just before the claim.
        reclaimed: True,
    }


def test_finish_held_ends_only_a_run_that_its_worker_holds() -> None:
    wid = held_workflow("ending")
    stream = Stream.objects.create(workflow_id=wid, key="out", created_at=timezone.now())
    runs = Workflow.objects
    assert runs.finish_held("someone-else", wid, Status.SUCCESS, output="1") == (
        False,
        NO_CHANGES,
    )
    assert (runs.get(pk=wid).status, Stream.objects.get(pk=stream.pk).closed_at) == (
        Status.RUNNING,
        None,
    )
    assert runs.finish_held("holder", wid, Status.SUCCESS, output="1") == (
        True,
        Changes(ended=((wid, Status.SUCCESS),)),
    )
    run = runs.get(pk=wid)
    assert (run.status, run.output, run.lease_owner, run.lease_expires_at) == (
        Status.SUCCESS,
        "1",
        None,
        None,
    )
    assert run.finished_at is not None
    assert Stream.objects.get(pk=stream.pk).closed_by_end
    assert not runs.finish_held("holder", wid, Status.ERROR, error="{}")[0]  # ended already
    assert runs.get(pk=wid).status == Status.SUCCESS


def test_a_checkpoint_is_stored_only_while_its_worker_holds_the_lease(
    transactional_db: None,
) -> None:
    wid = held_workflow("direct")
    later = timezone.now() + timedelta(minutes=5)
    assert checkpoint(wid, 0, "holder", later, output="[1, null]", attempts=2)
    assert Workflow.objects.get(pk=wid).lease_expires_at == later
    stored = Step.objects.get(workflow_id=wid, operation=0)
    assert (stored.name, stored.output, stored.error, stored.attempts) == (
        "s",
        "[1, null]",
        None,
        2,
    )
    assert not checkpoint(wid, 1, "someone-else", later + timedelta(minutes=1))
    Workflow.objects.filter(pk=wid).update(status=Status.CANCELLED)
    assert not checkpoint(wid, 2, "holder", later + timedelta(minutes=1))
    assert list(Step.objects.filter(workflow_id=wid).values_list("operation", flat=True)) == [0]
    assert Workflow.objects.get(pk=wid).lease_expires_at == later


def wal_flushes() -> int:
    with connection.cursor() as cursor:
        # This backend reports its statistics at most once a second unless told to.
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT wal_sync FROM pg_stat_wal")
        return cursor.fetchone()[0]


@pytest.mark.parametrize("flush_each", [False, True])
def test_checkpoints_wait_for_the_disk_only_when_asked(
    transactional_db: None, flush_each: bool
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("synchronous_commit: PostgreSQL only")
    connection.ensure_connection()
    if connection.pg_version < 150000:
        pytest.skip("pg_stat_force_next_flush: PostgreSQL 15 or later")
    wid = held_workflow("flushes")
    count = 40
    config = {**settings.DURABLE_STREAMS, "FLUSH_EACH_CHECKPOINT": flush_each}
    with override_settings(DURABLE_STREAMS=config):
        before = wal_flushes()
        for operation in range(count):
            assert checkpoint(wid, operation)
        flushes = wal_flushes() - before
    assert Step.objects.filter(workflow_id=wid).count() == count
    if flush_each:
        assert flushes >= count
    else:
        # The WAL writer flushes in the background (every 200 ms by default).
        assert flushes < count / 2


@pytest.mark.parametrize("prepared", [True, False])
def test_the_per_step_statements_are_prepared_and_django_queries_are_not(
    transactional_db: None, prepared: bool
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements: PostgreSQL only")
    wid = held_workflow("prepared")
    connection.close()  # a new session: no statement prepared yet
    config = {**settings.DURABLE_STREAMS, "PREPARED_STATEMENTS": prepared}
    with override_settings(DURABLE_STREAMS=config):
        for operation in range(3):
            assert checkpoint(wid, operation)
            assert Workflow.objects.filter(pk=wid).exists()  # a query of Django's own
        threshold = connection.connection.prepare_threshold
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            statements = [row[0] for row in cursor.fetchall()]
    assert threshold is None  # Django's setting, left as it was
    # Only the checkpoint's statement, once for its three runs.
    assert len(statements) == (1 if prepared else 0)
    assert all("INSERT INTO" in s and "fence" in s for s in statements)
    assert Step.objects.filter(workflow_id=wid).count() == 3


def test_a_stopping_worker_finishes_the_step_and_hands_the_workflow_back(
    worker_thread: Callable[..., Worker], run_burst: Callable[..., Worker]
) -> None:
    handle = workflows.graceful.start("handback", 0.5)
    wid = handle.workflow_id
    first = worker_thread(worker_id="stopping")
    wait_until(lambda: stream_length(wid, "progress") >= 1, timeout=10, what="the step to start")
    first.stop()
    wait_until(lambda: idle(first), timeout=10, what="the worker to stop")
    run = handle.get()
    # Handed back without counting the attempt.
    assert (run.status, run.lease_owner, run.attempts) == (Status.ENQUEUED, None, 0)
    assert list(Effect.objects.filter(workflow_id=wid).values_list("label", "worker")) == [
        ("handback-1", "stopping")
    ]

    run_burst(worker_id="next")
    assert handle.result(timeout=10) == "done"
    assert list(
        Effect.objects.filter(workflow_id=wid).order_by("pk").values_list("label", "worker")
    ) == [("handback-1", "stopping"), ("handback-2", "next")]
    assert stream_values(wid, "progress") == ["started", "between"]


def test_a_handed_back_workflow_wakes_an_idle_worker_at_once(
    worker_thread: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    claims: dict[str, int] = {}
    claim = Worker._claim

    def counted(self: Worker, limit: int, names: list[str]) -> Any:
        try:
            return claim(self, limit, names)
        finally:
            claims[self.worker_id] = claims.get(self.worker_id, 0) + 1

    monkeypatch.setattr(Worker, "_claim", counted)
    # Idle workers would otherwise look at the queue only every 30s.
    slow_polls = {**settings.DURABLE_STREAMS, "POLL_INTERVAL": 30.0, "NOTIFY_FALLBACK_POLL": 30.0}
    with override_settings(DURABLE_STREAMS=slow_polls):
        handle = workflows.graceful.start("wake", 0.3)
        wid = handle.workflow_id
        first = worker_thread(worker_id="leaving")
        wait_until(lambda: stream_length(wid, "progress") >= 1, timeout=10, what="the step")
        worker_thread(worker_id="idle")
        # The idle worker has looked at the queue and waits (until woken, or for 30 s).
        wait_until(lambda: claims.get("idle"), timeout=10, what="the idle worker's first claim")
        first.stop()
        assert handle.result(timeout=5) == "done"
    assert list(
        Effect.objects.filter(workflow_id=wid).order_by("pk").values_list("label", "worker")
    ) == [("wake-1", "leaving"), ("wake-2", "idle")]
    assert handle.get().attempts == 1


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor == "sqlite", reason="row locks: SQLite locks the file")
def test_a_long_atomic_step_does_not_cost_other_workflows_their_lease(
    worker_thread: Callable[..., Worker],
) -> None:
    # The atomic step's transaction holds its workflow's row for the whole step, longer than
    # a lease; the other workflow's lease must still be renewed meanwhile.
    with override_settings(DURABLE_STREAMS={**settings.DURABLE_STREAMS, "LEASE_SECONDS": 1.0}):
        atomic = start_workflow(workflows.long_atomic, "atomic", 3.0, workflow_id="a-atomic")
        other = start_workflow(workflows.graceful, "other", 3.0, workflow_id="b-other")
        holder = worker_thread(worker_id="holder", concurrency=2)
        wait_until(
            lambda: stream_length("b-other", "progress") >= 1, timeout=10, what="both to run"
        )
        worker_thread(worker_id="rival")
        assert atomic.result(timeout=20) == "atomic"
        assert other.result(timeout=20) == "done"
        wait_until(lambda: idle(holder), timeout=10, what="the holder to finish")
    assert list(
        Effect.objects.filter(workflow_id="b-other").order_by("pk").values_list("label", "worker")
    ) == [("other-1", "holder"), ("other-2", "holder")]
    assert (atomic.get().attempts, other.get().attempts) == (1, 1)


def test_a_run_whose_writes_keep_failing_ends_at_max_attempts(
    worker_thread: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = workflows.write_values.start("out", [1, 2])
    wid = handle.workflow_id
    Workflow.objects.filter(pk=wid).update(max_attempts=2)
    store = writer._store_batch

    def refuse_this_workflow(using: str, batch: Any) -> Any:
        if any(execution.workflow_id == wid for execution in batch):
            raise OperationalError("disk I/O error")
        return store(using, batch)

    # The database refuses this workflow's stream writes, every time.
    monkeypatch.setattr(writer, "_store_batch", refuse_this_workflow)
    worker_thread()
    # Every run stops at its failed write; the attempts must add up, not loop forever.
    wait_until(lambda: handle.status == Status.ERROR, timeout=15, what="the workflow to end")
    run = handle.get()
    assert run.decoded_error["type"] == "MaxAttemptsExceeded"
    assert "claimed 2 times" in run.decoded_error["message"]
    assert not StreamEntry.objects.filter(stream__workflow_id=wid).exists()


def test_a_signal_arriving_while_the_loop_holds_its_lock_does_not_hang(
    transactional_db: None,
) -> None:
    # A signal handler runs in the main thread between two bytecodes: maybe while the
    # worker's loop holds its lock. Handling it must not wait for that lock.
    worker = Worker(worker_id="signalled")
    handled = threading.Event()

    def loop_holding_the_lock() -> None:
        with worker._lock:
            worker._on_signal(signal.SIGTERM, None)
            handled.set()

    thread = threading.Thread(target=loop_holding_the_lock, daemon=True)
    thread.start()
    try:
        assert handled.wait(5), "the signal handler waited for the lock its own thread holds"
    finally:
        if not handled.is_set():
            worker._lock.release()  # let the stuck thread go
        thread.join(timeout=5)
    wait_until(worker._stopping.is_set, timeout=5, what="the worker to stop")


# max_attempts


def test_a_workflow_abandoned_max_attempts_times_ends_in_error(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.two_attempts.start()
    other = workflows.two_attempts.start()
    wid = handle.workflow_id
    for attempt in range(2):
        # A worker claims it and dies; its lease expires.
        assert claimed_ids(Worker(worker_id=f"crashed-{attempt}"), 1) == [wid]
        expire_lease(wid)
    assert handle.get().attempts == 2

    run_burst(worker_id="last")
    run = handle.get()
    assert run.status == Status.ERROR
    error = run.decoded_error
    assert error["type"] == "MaxAttemptsExceeded"
    assert (
        f"Workflow {wid!r} was claimed 2 times (max_attempts) without finishing" in error["message"]
    )
    assert "the last worker to hold it was 'crashed-1'" in error["message"]
    assert other.result(timeout=5) == "finished"  # one attempt short of the limit: it runs


def test_burst_mode_goes_on_after_giving_up_on_workflows(
    run_burst: Callable[..., Worker],
) -> None:
    exhausted = [workflows.two_attempts.start() for _ in range(3)]
    Workflow.objects.filter(pk__in=[h.workflow_id for h in exhausted]).update(attempts=2)
    fresh = workflows.echo.start("after them")
    run_burst(concurrency=2)
    assert {h.status for h in exhausted} == {Status.ERROR}
    assert fresh.result(timeout=5) == {"args": ["after them"], "kwargs": {}}
