"""Workflows that wait: durable sleep."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from durable_streams import WorkflowCancelled, read_stream, sleep
from durable_streams.models import Step
from durable_streams.worker import Worker
from tests import workflows_waiting as flows
from tests.processes import WorkerProcesses, worker_processes
from tests.stored import stream_length, stream_values
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def processes(transactional_db: None, tmp_path: Path) -> Iterator[WorkerProcesses]:
    with worker_processes(tmp_path) as started:
        yield started


def _wake_at(workflow_id: str) -> float:
    step = Step.objects.get(workflow_id=workflow_id, name="durable_streams.sleep")
    return float(json_output(step)["wake_at"])


def json_output(step: Step) -> dict[str, float]:
    output: dict[str, float] = json.loads(step.output or "{}")
    return output


# Bad input


def test_bad_seconds_are_refused_with_their_name() -> None:
    with pytest.raises(ValueError, match="seconds"):
        sleep(-1)
    with pytest.raises(ValueError, match="seconds"):
        sleep(math.nan)
    with pytest.raises(TypeError, match="seconds"):
        sleep("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seconds"):
        sleep(True)


def test_outside_a_workflow_sleep_is_a_plain_sleep() -> None:
    started = time.monotonic()
    sleep(0.05)
    assert time.monotonic() - started >= 0.05


# Sleep


def test_a_sleep_survives_sigkill_and_wakes_at_its_recorded_time(
    processes: WorkerProcesses,
) -> None:
    seconds = 4.0
    handle = flows.napper.start(seconds)
    wid = handle.workflow_id
    doomed = processes.start("doomed", lease_seconds=1.5)
    wait_until(lambda: stream_length(wid, "out") >= 1, timeout=30, what="the sleep to start")
    wake_at = _wake_at(wid)
    doomed.kill()
    # Recovered only after the wake time: the replay continues at once.
    wait_until(lambda: time.time() > wake_at + 1.0, timeout=seconds + 5, what="the wake time")
    successor_at = time.time()
    processes.start("successor", lease_seconds=1.5)
    try:
        elapsed = handle.result(timeout=30)
    except Exception:
        pytest.fail(f"the workflow did not finish:\n{processes.logs()}")
    woke = time.time()
    # A fresh sleep would end ``seconds`` after the successor's start.
    assert woke - successor_at < seconds - 1.0, processes.logs()
    assert elapsed >= seconds
    assert handle.get().attempts == 2
    assert stream_values(wid, "out") == ["asleep"]
    assert Step.objects.filter(workflow_id=wid, name="durable_streams.sleep").count() == 1


def test_a_replayed_sleep_waits_only_for_what_is_left(
    worker_thread: Callable[..., Worker],
) -> None:
    handle = flows.napper.start(4.0)
    wid = handle.workflow_id
    first = worker_thread(worker_id="first")
    wait_until(lambda: stream_length(wid, "out") >= 1, timeout=10, what="the sleep to start")
    wake_at = _wake_at(wid)
    # Stopped 1.5 s into the sleep: a fresh sleep would end 1.5 s after the recorded time.
    wait_until(lambda: time.time() > wake_at - 2.5, timeout=5, what="1.5 s of sleep")
    first.stop()  # the sleep is interrupted at once and the run handed back
    wait_until(lambda: handle.status == "ENQUEUED", timeout=5, what="the hand-back")
    worker_thread(worker_id="second")
    handle.result(timeout=10)
    # It woke at the recorded time, not 4 s after the second worker took it.
    assert abs(handle.get().finished_at.timestamp() - wake_at) < 1.0  # type: ignore[union-attr]
    assert handle.get().attempts == 1


# Cancel


def test_cancel_ends_a_sleeping_workflow_at_once(live_worker: Worker) -> None:
    handle = flows.napper.start(600)
    wid = handle.workflow_id
    wait_until(lambda: stream_length(wid, "out") >= 1, timeout=10, what="the sleep to start")
    cancelled = time.monotonic()
    assert handle.cancel()
    wait_until(lambda: wid not in live_worker._running, timeout=5, what="the run to stop")
    assert time.monotonic() - cancelled < 2
    with pytest.raises(WorkflowCancelled):
        list(read_stream(wid, "out", timeout=5))
