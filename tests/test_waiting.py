"""Workflows that wait: durable sleep, messages (send/recv) and events (set_event/get_event)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client, override_settings
from django.urls import reverse

from durable_streams import (
    DurableStreamsError,
    EventTimeout,
    MessageTimeout,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowNotFound,
    aget_event,
    get_event,
    read_stream,
    recv,
    send,
    set_event,
    sleep,
)
from durable_streams.conf import get_config
from durable_streams.exceptions import NotInWorkflow
from durable_streams.models import Event, Message, Step
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


def test_bad_arguments_are_refused_with_their_name() -> None:
    with pytest.raises(ValueError, match="seconds"):
        sleep(-1)
    with pytest.raises(ValueError, match="seconds"):
        sleep(math.nan)
    with pytest.raises(TypeError, match="seconds"):
        sleep("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seconds"):
        sleep(True)
    with pytest.raises(ValueError, match="topic"):
        recv("")
    with pytest.raises(ValueError, match="timeout"):
        recv(timeout=-1)
    with pytest.raises(NotInWorkflow, match="recv"):
        recv()
    with pytest.raises(NotInWorkflow, match="set_event"):
        set_event("k", 1)
    with pytest.raises(ValueError, match="workflow_id"):
        send("", 1)
    with pytest.raises(ValueError, match="key"):
        get_event("some-id", "")
    with pytest.raises(ValueError, match="timeout"):
        get_event("some-id", "k", timeout=math.inf)


def test_bad_messages_are_refused_before_anything_is_stored(
    run_burst: Callable[..., Worker],
) -> None:
    handle = flows.collector.start(1)
    wid = handle.workflow_id
    with pytest.raises(ValueError, match="topic"):
        send(wid, 1, topic="x" * 256)
    with pytest.raises(ValueError, match="idempotency_key"):
        send(wid, 1, idempotency_key="")
    with pytest.raises(TypeError, match="message to workflow"):
        send(wid, object())
    with pytest.raises(ValueError, match="MAX_VALUE_BYTES"):
        send(wid, "x" * (get_config().MAX_VALUE_BYTES + 1))
    with pytest.raises(WorkflowNotFound):
        send("no-such-workflow", 1)
    assert not Message.objects.exists()


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


# Messages


def test_a_hundred_messages_across_a_sigkill_are_received_once_each_in_order(
    processes: WorkerProcesses,
) -> None:
    count = 100
    handle = flows.collector.start(count)
    wid = handle.workflow_id
    # Kept until the workflow runs.
    for i in range(count // 2):
        send(wid, i)
    doomed = processes.start("doomed", lease_seconds=1.5)
    wait_until(lambda: stream_length(wid, "got") >= 10, timeout=30, what="some messages received")
    doomed.kill()
    for i in range(count // 2, count):
        send(wid, i)
    processes.start("successor", lease_seconds=1.5)
    try:
        assert handle.result(timeout=60) == count
    except Exception:
        pytest.fail(f"the workflow did not finish:\n{processes.logs()}")
    assert stream_values(wid, "got") == list(range(count))
    messages = Message.objects.filter(destination_id=wid)
    assert not messages.filter(consumed_operation__isnull=True).exists()
    assert len(set(messages.values_list("consumed_operation", flat=True))) == count


def test_an_idempotency_key_stores_a_repeated_send_once(live_worker: Worker) -> None:
    handle = flows.collector.start(2, "hook")
    wid = handle.workflow_id
    for _ in range(5):
        send(wid, {"paid": 10}, "hook", idempotency_key="evt-1")
    send(wid, "after", "hook")
    send(wid, "other topic")  # not on "hook": never received
    assert handle.result(timeout=10) == 2
    assert stream_values(wid, "got") == [{"paid": 10}, "after"]
    assert Message.objects.filter(destination_id=wid, idempotency_key="evt-1").count() == 1
    assert Message.objects.get(destination_id=wid, topic="").consumed_operation is None


def test_sends_from_a_workflow_body_are_not_repeated_by_its_replay(
    worker_thread: Callable[..., Worker],
) -> None:
    receiver = flows.collector.start(3, "fwd")
    target = receiver.workflow_id
    handle = flows.forwarder.start(target, ["a", "b", "c"])
    wid = handle.workflow_id
    first = worker_thread(worker_id="first", queues=["default"])
    wait_until(lambda: stream_length(wid, "out") >= 1, timeout=10, what="the sends")
    first.stop()
    wait_until(lambda: handle.status == "ENQUEUED", timeout=5, what="the hand-back")
    worker_thread(worker_id="second")
    send(wid, "bye", "end")
    handle.result(timeout=10)
    assert receiver.result(timeout=10) == 3
    assert stream_values(target, "got") == ["a", "b", "c"]
    assert Message.objects.filter(destination_id=target).count() == 3


def test_a_recv_timeout_is_recorded_and_raised_again_by_the_replay(
    worker_thread: Callable[..., Worker],
) -> None:
    handle = flows.impatient.start(0.3)
    wid = handle.workflow_id
    first = worker_thread(worker_id="first")
    wait_until(lambda: stream_length(wid, "out") >= 2, timeout=10, what="the timeout")
    # Had the replay not recorded the timeout, it would receive this message instead.
    send(wid, "late", "never")
    first.stop()
    wait_until(lambda: handle.status == "ENQUEUED", timeout=5, what="the hand-back")
    worker_thread(worker_id="second")
    send(wid, "go!", "go")
    assert handle.result(timeout=10) == "go!"
    assert stream_values(wid, "out") == ["waiting", "timed out"]
    assert Message.objects.get(destination_id=wid, topic="never").consumed_operation is None
    timeout = Step.objects.get(workflow_id=wid, name="durable_streams.recv", status="ERROR")
    assert "MessageTimeout" in (timeout.error or "")


def test_the_timeout_error_is_a_durable_streams_error_and_a_timeout_error() -> None:
    assert issubclass(MessageTimeout, DurableStreamsError)
    assert issubclass(MessageTimeout, TimeoutError)
    assert issubclass(EventTimeout, DurableStreamsError)
    assert issubclass(EventTimeout, TimeoutError)


# Events


def test_get_event_sees_each_new_value(live_worker: Worker) -> None:
    handle = flows.publisher.start(3)
    wid = handle.workflow_id
    assert get_event(wid, "progress", timeout=10) == 0
    for expected in (1, 2, "done"):
        send(wid, "more", "next")
        wait_until(
            lambda expected=expected: get_event(wid, "progress", timeout=5) == expected,  # type: ignore[misc]
            timeout=10,
            what=f"progress {expected!r}",
        )
    assert handle.result(timeout=10) == 3
    with pytest.raises(EventTimeout, match="missing"):
        get_event(wid, "missing", timeout=0.2)
    with pytest.raises(WorkflowNotFound):
        get_event("no-such-workflow", "progress", timeout=1)


def test_get_event_waits_until_the_key_is_set(live_worker: Worker) -> None:
    handle = flows.collector.start(1)  # never sets the key: a step of publisher will
    wid = handle.workflow_id
    with pytest.raises(EventTimeout):
        get_event(wid, "progress", timeout=0.3)
    publisher = flows.publisher.start(0)
    assert get_event(publisher.workflow_id, "progress", timeout=10) == "done"
    send(wid, "end")
    handle.result(timeout=10)


async def test_aget_event(async_db: None, live_worker: Worker) -> None:
    from asgiref.sync import sync_to_async

    handle = await sync_to_async(flows.publisher.start)(0)
    assert await aget_event(handle.workflow_id, "progress", timeout=10) == "done"
    with pytest.raises(EventTimeout):
        await aget_event(handle.workflow_id, "other", timeout=0.2)
    with pytest.raises(WorkflowNotFound):
        await aget_event("no-such-workflow", "progress", timeout=1)


# Cancel and leases


@pytest.mark.parametrize("waits", ["sleep", "recv"])
def test_cancel_ends_a_waiting_workflow_at_once(live_worker: Worker, waits: str) -> None:
    if waits == "sleep":
        handle = flows.napper.start(600)
        key = "out"
    else:
        handle = flows.collector.start(1)
        key = "out"
    wid = handle.workflow_id
    wait_until(lambda: stream_length(wid, key) >= 1, timeout=10, what="the wait to start")
    cancelled = time.monotonic()
    assert handle.cancel()
    wait_until(lambda: wid not in live_worker._running, timeout=5, what="the run to stop")
    assert time.monotonic() - cancelled < 2
    with pytest.raises(WorkflowCancelled):
        list(read_stream(wid, key, timeout=5))


def test_a_long_wait_keeps_its_lease(worker_thread: Callable[..., Worker]) -> None:
    config = {**settings.DURABLE_STREAMS, "LEASE_SECONDS": 1.0}
    with override_settings(DURABLE_STREAMS=config):
        handle = flows.collector.start(1)
        wid = handle.workflow_id
        worker_thread(worker_id="holder")
        wait_until(lambda: stream_length(wid, "out") >= 1, timeout=10, what="the wait to start")
        # Another worker would take the run over if the lease lapsed during the wait.
        rival = worker_thread(worker_id="rival")
        wait_until(
            lambda: handle.get().lease_expires_at.timestamp() > time.time() + 0.5,  # type: ignore[union-attr]
            timeout=5,
            what="a renewed lease",
        )
        time.sleep(3.0)  # a deliberate wait: three leases long, nothing is to happen
        run = handle.get()
        assert (run.lease_owner, run.attempts) == ("holder", 1)
        send(wid, "x")
        handle.result(timeout=10)
        assert rival.completed == 0


# Admin


def test_the_workflow_page_lists_messages_and_events_bounded(admin_client: Client) -> None:
    from durable_streams.admin import display

    handle = flows.collector.start(1, "t")
    wid = handle.workflow_id
    for i in range(display.PAGE_MESSAGES + 2):
        send(wid, f"pending-<{i}>", "t")
    Message.objects.filter(destination_id=wid, value='"pending-<0>"').update(consumed_operation=1)
    Event.objects.create(workflow_id=wid, key="progress", value='{"pct": 40}')
    response = admin_client.get(reverse("admin:durable_streams_workflow_change", args=[wid]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "<h2>Messages</h2>" in html and "<h2>Events</h2>" in html
    rows = response.context["workflow_messages"]
    # The newest first, at most a page of them; values escaped.
    assert len(rows) == display.PAGE_MESSAGES
    assert rows[0]["value"] == f'"pending-<{display.PAGE_MESSAGES + 1}>"'
    assert "pending-&lt;21&gt;" in html
    assert response.context["more_workflow_messages"]
    assert "Pending" in html
    assert [e["key"] for e in response.context["workflow_events"]] == ["progress"]
    assert "&quot;pct&quot;: 40" in html


def test_a_received_message_shows_its_operation(admin_client: Client, live_worker: Worker) -> None:
    handle = flows.collector.start(1, "t")
    send(handle.workflow_id, "hello", "t")
    handle.result(timeout=10)
    response = admin_client.get(
        reverse("admin:durable_streams_workflow_change", args=[handle.workflow_id])
    )
    assert "Received (op. 1)" in response.content.decode()


def test_a_replay_that_meets_another_wait_is_non_deterministic(
    worker_thread: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = flows.swapper.start()
    wid = handle.workflow_id
    first = worker_thread(worker_id="first")
    wait_until(
        lambda: Step.objects.filter(workflow_id=wid, name="durable_streams.sleep").exists(),
        timeout=10,
        what="the sleep to be recorded",
    )
    first.stop()
    wait_until(lambda: handle.status == "ENQUEUED", timeout=5, what="the hand-back")
    monkeypatch.setitem(flows.swapped, "on", True)
    worker_thread(worker_id="second")
    with pytest.raises(WorkflowFailed, match=r"reached recv\(\) at operation 1, but an earlier"):
        handle.result(timeout=10)
