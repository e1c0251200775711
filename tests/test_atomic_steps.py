"""Stream writes from an atomic step commit, or roll back, with the step."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from durable_streams import Status, cancel_workflow, read_stream
from durable_streams.models import Step, Workflow
from durable_streams.worker import Worker
from tests import workflows_atomic
from tests.models import Effect
from tests.waiting import wait_until

postgres_only = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL"), reason="row locks: PostgreSQL only"
)


def test_values_of_a_failed_attempt_roll_back_with_it(run_burst):
    handle = workflows_atomic.atomic_stream_writer.start("rolled", True)
    run_burst()
    assert handle.result(timeout=10) == 1
    assert workflows_atomic.attempts("rolled") == 2
    assert Effect.objects.filter(label="rolled").count() == 1
    values = list(read_stream(handle.workflow_id, "atomic", timeout=5))
    assert values == ["before", "rolled-a", "rolled-b", "after"]


def test_values_commit_with_the_step(run_burst):
    handle = workflows_atomic.atomic_stream_writer.start("committed", False)
    run_burst()
    assert handle.result(timeout=10) == 1
    values = list(read_stream(handle.workflow_id, "atomic", timeout=5))
    assert values == ["before", "committed-a", "committed-b", "after"]


@pytest.fixture
def waiting_step() -> Iterator[None]:
    workflows_atomic.step_running.clear()
    workflows_atomic.step_may_end.clear()
    yield
    workflows_atomic.step_may_end.set()  # never leave a worker thread waiting


@postgres_only
def test_a_cancel_does_not_wait_for_a_running_atomic_step(
    worker_thread: Callable[..., Worker], waiting_step: None
) -> None:
    handle = workflows_atomic.waits_in_an_atomic_step.start("cancelled mid-step")
    worker = worker_thread(worker_id="atomic")
    assert workflows_atomic.step_running.wait(10)
    asked = time.monotonic()
    assert cancel_workflow(handle.workflow_id)
    assert time.monotonic() - asked < 2  # it used to wait for the step's transaction
    workflows_atomic.step_may_end.set()
    wait_until(lambda: not worker._running, timeout=10, what="the run to stop")
    # The step's end found the workflow cancelled: its writes and checkpoint rolled back.
    assert handle.get().status == Status.CANCELLED
    assert not Effect.objects.filter(label="cancelled mid-step").exists()
    assert not Step.objects.filter(workflow_id=handle.workflow_id).exists()


@postgres_only
def test_the_heartbeat_renews_the_lease_while_an_atomic_step_runs(
    worker_thread: Callable[..., Worker], waiting_step: None
) -> None:
    config: dict[str, Any] = {"LEASE_SECONDS": 1.0, "HEARTBEAT_SECONDS": 0.2}
    with override_settings(DURABLE_STREAMS={**settings.DURABLE_STREAMS, **config}):
        handle = workflows_atomic.waits_in_an_atomic_step.start("renewed mid-step")
        worker_thread(worker_id="atomic")
        assert workflows_atomic.step_running.wait(10)
        first = Workflow.objects.get(pk=handle.workflow_id).lease_expires_at
        assert first is not None
        # Renewed twice over while the step still runs: past the lease that the claim gave.
        run = wait_until(
            lambda: Workflow.objects.filter(
                pk=handle.workflow_id,
                lease_owner="atomic",
                lease_expires_at__gt=first + timedelta(seconds=2),
            ).first(),
            timeout=15,
            what="the lease renewed while the atomic step runs",
        )
        assert run.status == Status.RUNNING
        assert not workflows_atomic.step_may_end.is_set()
        workflows_atomic.step_may_end.set()
        assert handle.result(timeout=10) == "renewed mid-step"
    assert Effect.objects.filter(label="renewed mid-step").count() == 1
