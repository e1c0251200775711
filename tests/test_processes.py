"""Real ``runworkers`` processes: killed, terminated and racing workers.

Each test starts worker processes on the test database (``tests.processes``) and kills
whatever is still running when it ends. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import transaction

from durable_streams import Status
from durable_streams.models import TERMINAL_STATUSES, Step, Stream, Workflow
from tests import workflows
from tests.models import Effect
from tests.processes import WorkerProcesses, worker_processes
from tests.stored import stream_entries, stream_length
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

ON_POSTGRES = bool(os.environ.get("DATABASE_URL"))
postgres_only = [
    pytest.mark.postgres,
    pytest.mark.skipif(not ON_POSTGRES, reason="needs PostgreSQL (set DATABASE_URL)"),
]


@pytest.fixture
def processes(transactional_db: None, tmp_path: Path) -> Iterator[WorkerProcesses]:
    with worker_processes(tmp_path) as started:
        yield started


def test_a_killed_worker_is_replaced_and_every_value_is_written_once(
    processes: WorkerProcesses,
) -> None:
    count = 12
    handle = workflows.steady.start(count, 0.15)
    wid = handle.workflow_id
    doomed = processes.start("doomed", lease_seconds=1.5)
    wait_until(lambda: stream_length(wid, "out") >= 3, timeout=30, what="three values")

    doomed.send(signal.SIGKILL)
    assert doomed.wait(10) == -signal.SIGKILL
    written_before = stream_length(wid, "out")
    assert written_before < count, "the workflow ended before the kill"
    run = handle.get()
    assert (run.status, run.lease_owner) == (Status.RUNNING, "doomed")

    processes.start("successor", lease_seconds=1.5)
    try:
        assert handle.result(timeout=60) == count
    except Exception:
        pytest.fail(f"the workflow did not finish:\n{processes.logs()}")

    # Each atomic step's side effect happened exactly once, across both workers.
    labels = Counter(Effect.objects.filter(workflow_id=wid).values_list("label", flat=True))
    assert labels == Counter({f"step-{i}": 1 for i in range(count)})
    # The stream is 0..N-1: nothing written twice, nothing missing.
    assert stream_entries(wid, "out") == [(i, i) for i in range(count)]
    stream = Stream.objects.get(workflow_id=wid, key="out")
    assert (stream.length, stream.is_closed, stream.closed_by_end) == (count, True, False)
    run = handle.get()
    assert run.attempts == 2
    assert "Lease of worker doomed expired; resuming from checkpoints" in processes.logs()


def test_sigterm_finishes_the_step_then_hands_the_workflow_over_at_once(
    processes: WorkerProcesses,
) -> None:
    lease = 30.0
    handle = workflows.graceful.start("term", None)
    wid = handle.workflow_id
    terminated = processes.start("terminated", lease_seconds=lease)
    wait_until(lambda: stream_length(wid, "progress") >= 1, timeout=30, what="the step to start")
    # Idle meanwhile: the running workflow's lease is held.
    processes.start("successor", lease_seconds=lease)
    assert not Effect.objects.filter(workflow_id=wid).exists(), "the step ended too soon"

    terminated.send(signal.SIGTERM)
    wait_until(lambda: "SIGTERM received" in terminated.log(), timeout=10, what="the signal")
    assert terminated.returncode is None  # still in the step
    Effect.objects.create(workflow_id="", label="term-1-release")  # the step may end now
    assert terminated.wait(20) == 0, terminated.log()
    exited = time.monotonic()
    assert handle.result(timeout=15) == "done"
    # Resumed at once, long before the lease would have expired.
    assert time.monotonic() - exited < 5

    assert list(
        Effect.objects.filter(workflow_id=wid).order_by("pk").values_list("label", "worker")
    ) == [("term-1", "terminated"), ("term-2", "successor")]
    assert stream_entries(wid, "progress") == [(0, "started"), (1, "between")]
    # The hand-back did not count as an attempt.
    assert handle.get().attempts == 1
    assert "back in the queue" in terminated.log()


def test_a_second_signal_exits_at_once(processes: WorkerProcesses) -> None:
    handle = workflows.graceful.start("twice", 60)
    wid = handle.workflow_id
    impatient = processes.start("impatient", lease_seconds=30, grace_seconds=60)
    wait_until(lambda: stream_length(wid, "progress") >= 1, timeout=30, what="the step to start")

    impatient.send(signal.SIGTERM)
    wait_until(lambda: "SIGTERM received" in impatient.log(), timeout=10, what="the first signal")
    time.sleep(0.2)  # a deliberate wait: nothing is to happen
    assert impatient.returncode is None  # still waiting for the step
    signalled = time.monotonic()
    impatient.send(signal.SIGINT)
    assert impatient.wait(5) == 1
    assert time.monotonic() - signalled < 3
    assert "Second signal: exiting now" in impatient.log()
    # Nothing was recorded: the lease runs out and another worker resumes the workflow.
    run = handle.get()
    assert (run.status, run.lease_owner) == (Status.RUNNING, "impatient")
    assert not Effect.objects.filter(workflow_id=wid).exists()


@pytest.mark.parametrize(
    "count",
    [
        pytest.param(200, marks=postgres_only, id="postgres-200"),
        pytest.param(
            60,
            marks=pytest.mark.skipif(ON_POSTGRES, reason="the PostgreSQL run races for 200"),
            id="sqlite-60",
        ),
    ],
)
def test_racing_workers_never_run_a_workflow_twice(processes: WorkerProcesses, count: int) -> None:
    racers = [
        processes.start(name, concurrency=8, wait_started=False) for name in ("racer-a", "racer-b")
    ]
    for racer in racers:
        racer.wait_started()
    # One commit: both workers hear of all the work at the same moment.
    with transaction.atomic():
        handles = [workflows.claim_race.start(f"race-{i}") for i in range(count)]
    ids = [h.workflow_id for h in handles]

    def all_ended() -> bool:
        ended = Workflow.objects.filter(pk__in=ids, status__in=TERMINAL_STATUSES).count()
        return ended == count

    wait_until(all_ended, timeout=120, interval=0.2, what=f"{count} workflows to end")
    assert set(Workflow.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
        Status.SUCCESS
    }
    # A non-atomic step records one Effect per execution: exactly one per workflow.
    effects = list(Effect.objects.values_list("workflow_id", "label", "worker"))
    assert len(effects) == count
    assert Counter(workflow_id for workflow_id, _, _ in effects) == Counter(ids)
    by_worker = Counter(worker for _, _, worker in effects)
    assert set(by_worker) == {"racer-a", "racer-b"}, by_worker  # both really raced
    assert set(Workflow.objects.filter(pk__in=ids).values_list("attempts", flat=True)) == {1}
    assert Step.objects.filter(workflow_id__in=ids).count() == count
