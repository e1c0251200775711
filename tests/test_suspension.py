"""Waiting costs no worker: long sleeps and recvs suspend the run (status WAITING)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from durable_streams import Status, cancel_workflow, send
from durable_streams.conf import get_config
from durable_streams.exceptions import ConfigurationError
from durable_streams.models import Stream, StreamState, Workflow
from durable_streams.testing import run_workflow
from durable_streams.worker import Worker
from tests import workflows_waiting as flows
from tests.processes import WorkerProcesses, worker_processes
from tests.stored import stream_values
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

# Worker processes of these tests suspend every wait longer than this.
SUSPEND = {"DS_SUSPEND_AFTER_SECONDS": "0.1"}


@pytest.fixture
def processes(transactional_db: None, tmp_path: Path) -> Iterator[WorkerProcesses]:
    with worker_processes(tmp_path) as started:
        yield started


def _waiting(ids: list[str]) -> int:
    return Workflow.objects.filter(
        pk__in=ids, status=Status.WAITING, lease_owner__isnull=True, lease_expires_at__isnull=True
    ).count()


def _ended(ids: list[str]) -> int:
    return Workflow.objects.filter(pk__in=ids, status=Status.SUCCESS).count()


@pytest.mark.parametrize(
    ("value", "problem"),
    [(-0.5, "at least 0"), (3_601, "at most 3600"), ("1", "number"), (float("nan"), "finite")],
)
def test_the_threshold_is_range_checked(value: object, problem: str) -> None:
    with (
        override_settings(DURABLE_STREAMS={"SUSPEND_AFTER_SECONDS": value}),
        pytest.raises(ConfigurationError, match=f"SUSPEND_AFTER_SECONDS.*{problem}"),
    ):
        get_config()


def test_two_hundred_runs_wait_on_two_slots_then_all_finish(
    processes: WorkerProcesses,
) -> None:
    handles = [flows.collector.start(1) for _ in range(200)]
    ids = [handle.workflow_id for handle in handles]
    worker = processes.start("two-slots", concurrency=2, env_overrides=SUSPEND)
    # Every run wrote before its recv, then let its slot go: two slots served all 200.
    wait_until(lambda: _waiting(ids) == 200, timeout=180, what="200 suspended runs")
    assert all(stream_values(wid, "out") == ["ready"] for wid in ids)
    assert handles[0].status == Status.WAITING
    assert set(Workflow.objects.filter(pk__in=ids).values_list("wait_topic", flat=True)) == {""}
    for number, wid in enumerate(ids):
        send(wid, number)
    wait_until(lambda: _ended(ids) == 200, timeout=180, what=f"200 ends:\n{worker.log()}")
    for number, wid in enumerate(ids):
        assert stream_values(wid, "got") == [number]
    # A suspension counts no attempt: each run was claimed for its start and its wake-up.
    assert set(Workflow.objects.filter(pk__in=ids).values_list("attempts", flat=True)) == {1}


def test_a_suspended_sleep_wakes_at_its_time(processes: WorkerProcesses) -> None:
    seconds = 2.0
    handle = flows.napper.start(seconds)
    processes.start("sleeper", concurrency=1, env_overrides=SUSPEND)
    wait_until(lambda: _waiting([handle.workflow_id]) == 1, timeout=30, what="the suspension")
    run = handle.get()
    assert run.wait_topic is None and run.wake_at is not None
    # Ends within the documented slack of its wake time: no polling loop of a second.
    elapsed = handle.result(timeout=seconds + 30)
    assert seconds <= elapsed < seconds + 0.8


def test_cancel_ends_a_suspended_run_at_once(processes: WorkerProcesses) -> None:
    handle = flows.collector.start(1)
    wid = handle.workflow_id
    processes.start("canceller", concurrency=1, env_overrides=SUSPEND)
    wait_until(lambda: _waiting([wid]) == 1, timeout=30, what="the suspension")
    assert cancel_workflow(wid) is True
    assert handle.status == Status.CANCELLED
    assert Stream.objects.get(workflow_id=wid, key="out").state == StreamState.INTERRUPTED
    # A message now wakes nothing: a cancelled run is never claimed again.
    send(wid, "late")
    assert handle.status == Status.CANCELLED
    assert not cancel_workflow(wid)


def test_sigkill_while_runs_are_suspended_loses_nothing(processes: WorkerProcesses) -> None:
    handles = [flows.collector.start(2) for _ in range(20)]
    ids = [handle.workflow_id for handle in handles]
    doomed = processes.start("doomed", concurrency=2, env_overrides=SUSPEND)
    wait_until(lambda: _waiting(ids) == 20, timeout=60, what="20 suspended runs")
    for wid in ids:
        send(wid, "first")
    # Each took its first message and waits again for the second.
    wait_until(
        lambda: all(stream_values(wid, "got") == ["first"] for wid in ids) and _waiting(ids) == 20,
        timeout=60,
        what="20 runs waiting for their second message",
    )
    doomed.kill()
    successor = processes.start("successor", concurrency=2, env_overrides=SUSPEND)
    for wid in ids:
        send(wid, "second")
    wait_until(lambda: _ended(ids) == 20, timeout=60, what=f"20 ends:\n{successor.log()}")
    for wid in ids:
        assert stream_values(wid, "got") == ["first", "second"]
        assert json.loads(Workflow.objects.get(pk=wid).output or "null") == 2


def test_a_burst_worker_stays_for_the_timers_of_suspended_runs(
    transactional_db: None, caplog: pytest.LogCaptureFixture
) -> None:
    with override_settings(
        DURABLE_STREAMS={**settings.DURABLE_STREAMS, "SUSPEND_AFTER_SECONDS": 0}
    ):
        caplog.set_level("INFO", logger="durable_streams.worker")
        run = run_workflow(flows.napper, 0.3)
    assert run.status == Status.SUCCESS
    assert run.output >= 0.3
    assert "Sleeping until" in caplog.text


def test_run_workflow_says_when_a_run_is_left_waiting_for_a_message(
    transactional_db: None,
) -> None:
    config = {**settings.DURABLE_STREAMS, "SUSPEND_AFTER_SECONDS": 0}
    with (
        override_settings(DURABLE_STREAMS=config),
        pytest.raises(AssertionError, match="WAITING.*recv"),
    ):
        run_workflow(flows.collector, 1)


def test_a_recv_keeps_its_deadline_when_its_run_is_queued_again(transactional_db: None) -> None:
    config = {**settings.DURABLE_STREAMS, "SUSPEND_AFTER_SECONDS": 0}
    with override_settings(DURABLE_STREAMS=config):
        handle = flows.first_recv.start(2.0)
        wid = handle.workflow_id
        # Not a burst worker: one could leave between its claim and the re-queueing.
        worker = Worker()
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: _waiting([wid]) == 1, timeout=30, what="the suspension")
            first = Workflow.objects.get(pk=wid)
            assert first.wake_at is not None
            # Handed back to the queue with its wait recorded (a shutdown after its wake-up).
            Workflow.objects.filter(pk=wid).update(status=Status.ENQUEUED)
            wait_until(
                lambda: (
                    _waiting([wid]) == 1
                    and Workflow.objects.get(pk=wid).updated_at > first.updated_at
                ),
                timeout=30,
                what="the second suspension",
            )
            # The deadline still counts from the first run's recv.
            assert Workflow.objects.get(pk=wid).wake_at == first.wake_at
            assert handle.result(timeout=30) == "timed out"
        finally:
            worker.stop()
            thread.join(30)
