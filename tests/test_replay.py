"""Replay: checkpointed steps, recorded writes, recorded errors, non-determinism, retries."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.utils import timezone

from durable_streams import Status, WorkflowFailed
from durable_streams.models import Step, Stream, StreamEntry
from durable_streams.worker import Worker
from tests import workflows
from tests.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

COUNTED_PLAIN = "tests.workflows.counted_plain"


def record_step(
    workflow_id: str,
    operation: int,
    name: str,
    *,
    output: Any = None,
    error: dict[str, str] | None = None,
) -> None:
    """Store the checkpoint that an earlier (crashed) run of the workflow left."""
    now = timezone.now()
    Step.objects.create(
        workflow_id=workflow_id,
        operation=operation,
        name=name,
        status=Step.Outcome.SUCCESS if error is None else Step.Outcome.ERROR,
        output=None if error is not None else json.dumps(output),
        error=None if error is None else json.dumps(error),
        started_at=now,
        finished_at=now,
    )


def record_writes(
    workflow_id: str, key: str, writes: list[tuple[int, Any]], *, close_operation: int | None = None
) -> None:
    """Store body writes (operation, value) of an earlier run, and optionally its close."""
    stream = Stream.objects.create(
        workflow_id=workflow_id,
        key=key,
        length=len(writes),
        closed_at=timezone.now() if close_operation is not None else None,
        close_operation=close_operation,
    )
    for offset, (operation, value) in enumerate(writes):
        StreamEntry.objects.create(
            stream=stream, offset=offset, value=json.dumps(value), operation=operation
        )


def stream_values(workflow_id: str, key: str = "out") -> list[tuple[int, Any, int | None]]:
    rows = StreamEntry.objects.filter(stream__workflow_id=workflow_id, stream__key=key)
    return [(e.offset, e.decoded_value, e.operation) for e in rows.order_by("offset")]


def test_a_recorded_step_returns_its_output_without_running(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.replayable.start("replay")
    record_step(handle.workflow_id, 0, COUNTED_PLAIN, output="from the checkpoint")
    run_burst()
    assert handle.result(timeout=5) == ["from the checkpoint", "a"]
    assert not Effect.objects.filter(label="replay").exists()
    # Operations: 0 the recorded step, 1 a write, 2 step_a, 3 a write.
    assert stream_values(handle.workflow_id) == [(0, "from the checkpoint", 1), (1, "a", 3)]
    steps = Step.objects.filter(workflow_id=handle.workflow_id)
    assert list(steps.values_list("operation", "name")) == [
        (0, COUNTED_PLAIN),
        (2, "tests.workflows.step_a"),
    ]


def test_without_a_checkpoint_the_step_runs(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.replayable.start("fresh")
    run_burst()
    assert handle.result(timeout=5) == ["fresh", "a"]
    assert Effect.objects.filter(label="fresh").count() == 1
    step = Step.objects.get(workflow_id=handle.workflow_id, operation=0)
    assert (
        step.name,
        step.status,
        step.attempts,
        step.output,
    ) == (
        COUNTED_PLAIN,
        Step.Outcome.SUCCESS,
        1,
        '"fresh"',
    )


def test_recorded_writes_are_skipped_and_later_ones_follow_them(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.replayable.start("writes")
    record_step(handle.workflow_id, 0, COUNTED_PLAIN, output="recorded")
    record_writes(handle.workflow_id, "out", [(1, "recorded")])
    run_burst()
    assert handle.result(timeout=5) == ["recorded", "a"]
    assert stream_values(handle.workflow_id) == [(0, "recorded", 1), (1, "a", 3)]


def test_a_recorded_close_is_skipped(run_burst: Callable[..., Worker]) -> None:
    partly = workflows.write_values.start("out", [1, 2, 3])
    record_writes(partly.workflow_id, "out", [(0, 1), (1, 2)])
    closed = workflows.write_values.start("out", [1, 2, 3])
    record_writes(closed.workflow_id, "out", [(0, 1), (1, 2), (2, 3)], close_operation=3)
    run_burst()
    for handle in (partly, closed):
        assert handle.result(timeout=5) == 3
        assert stream_values(handle.workflow_id) == [(0, 1, 0), (1, 2, 1), (2, 3, 2)]
        stream = Stream.objects.get(workflow_id=handle.workflow_id)
        assert (stream.close_operation, stream.closed_by_end, stream.length) == (3, False, 3)


def test_a_recorded_error_is_raised_again_as_step_failed(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.catches_step_failure.start("recorded-error")
    record_step(
        handle.workflow_id,
        0,
        "tests.workflows.flaky",
        error={"type": "ConnectionError", "message": "recorded boom", "traceback": ""},
    )
    run_burst()
    assert handle.result(timeout=5) == "ConnectionError: recorded boom"
    assert not Effect.objects.filter(label="recorded-error").exists()


def test_a_failing_step_gives_step_failed_live_and_records_it(
    run_burst: Callable[..., Worker],
) -> None:
    caught = workflows.catches_step_failure.start("live-error")
    uncaught = workflows.retrying.start("uncaught", 5)
    run_burst()
    assert caught.result(timeout=5) == "ConnectionError: attempt failed for live-error"
    with pytest.raises(WorkflowFailed) as info:
        uncaught.result(timeout=5)
    assert info.value.error_type == "StepFailed"
    assert info.value.message == (
        "Step 'tests.workflows.flaky' failed: ConnectionError: attempt failed for uncaught"
    )
    for handle, label in [(caught, "live-error"), (uncaught, "uncaught")]:
        step = Step.objects.get(workflow_id=handle.workflow_id)
        assert (step.status, step.attempts) == (Step.Outcome.ERROR, 3)
        assert json.loads(step.error)["type"] == "ConnectionError"
        assert Effect.objects.filter(label=label).count() == 3  # retries=2


@pytest.mark.parametrize("body", ["one_step", "swallow_everything"])
def test_a_different_step_at_a_recorded_position_fails_the_workflow(
    run_burst: Callable[..., Worker], body: str
) -> None:
    handle = getattr(workflows, body).start()
    record_step(handle.workflow_id, 0, "tests.something.else", output="x")
    run_burst()
    with pytest.raises(WorkflowFailed) as info:
        handle.result(timeout=5)
    # swallow_everything catches every Exception: the workflow fails all the same.
    assert info.value.error_type == "NonDeterministicWorkflow"
    assert "at operation 0" in info.value.message
    assert "an earlier run recorded step 'tests.something.else' there" in info.value.message
    assert not Effect.objects.exists()


def test_a_step_where_a_write_was_recorded_is_non_deterministic(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.one_step.start()
    record_writes(handle.workflow_id, "out", [(0, "a write")])
    run_burst()
    with pytest.raises(WorkflowFailed) as info:
        handle.result(timeout=5)
    assert info.value.error_type == "NonDeterministicWorkflow"
    assert f"reached step {COUNTED_PLAIN!r}" in info.value.message
    assert "recorded write_stream('out')" in info.value.message
    assert not Effect.objects.exists()


def test_step_retries_wait_with_backoff(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.retrying_backoff.start("backoff", 2)
    run_burst()
    assert handle.result(timeout=10) == "backoff ok"
    step = Step.objects.get(workflow_id=handle.workflow_id)
    assert (step.status, step.attempts) == (Step.Outcome.SUCCESS, 3)
    assert Effect.objects.filter(label="backoff").count() == 3
    # backoff=0.1: waits of about 0.1s then 0.2s, each within 10%.
    assert 0.27 <= step.duration.total_seconds() < 2


def test_the_workflow_gets_the_decoded_json_of_a_step_result(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.returns_step_tuple.start()
    run_burst()
    assert handle.result(timeout=5) == ["list", [1, "two", [3.5]]]


@pytest.mark.parametrize(
    ("atomic", "step_name"),
    [(False, "tests.workflows.returns_set"), (True, "tests.workflows.returns_set_atomic")],
)
def test_a_step_result_that_is_not_json_fails_clearly(
    run_burst: Callable[..., Worker], atomic: bool, step_name: str
) -> None:
    handle = workflows.bad_step_result.start(atomic)
    run_burst()
    with pytest.raises(WorkflowFailed) as info:
        handle.result(timeout=5)
    assert f"The result of step {step_name!r} must be JSON-serializable" in info.value.message
    assert "a value of type set is not" in info.value.message
    assert handle.status == Status.ERROR


@pytest.mark.parametrize("atomic", [False, True])
def test_a_step_result_nested_too_deeply_fails_the_workflow_naming_the_step(
    run_burst: Callable[..., Worker], atomic: bool
) -> None:
    handle = workflows.deep_step_result.start(atomic)
    run_burst()
    with pytest.raises(WorkflowFailed) as info:
        handle.result(timeout=5)
    name = "tests.workflows.returns_deep_atomic" if atomic else "tests.workflows.returns_deep"
    # An atomic step's result is encoded inside its attempt: the step fails with it.
    assert info.value.error_type == ("StepFailed" if atomic else "ValueError")
    assert f"The result of step {name!r} is nested too deeply" in info.value.message
    assert not Step.objects.filter(workflow_id=handle.workflow_id, status="SUCCESS").exists()


def test_a_workflow_result_nested_too_deeply_fails_it(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.deep_result.start()
    run_burst()
    with pytest.raises(WorkflowFailed) as info:
        handle.result(timeout=5)
    assert "The result of workflow 'tests.workflows.deep_result' is nested too deeply" in (
        info.value.message
    )


def test_an_atomic_step_rolls_back_the_writes_of_failed_attempts(
    run_burst: Callable[..., Worker],
) -> None:
    succeeds = workflows.atomic_rollback.start("atomic-ok", 2)
    fails = workflows.atomic_rollback.start("atomic-fails", 10)
    run_burst()
    assert succeeds.result(timeout=5) == "atomic-ok ok"
    # Three attempts ran; the two that failed left nothing behind.
    assert Effect.objects.filter(label="atomic-ok").count() == 1
    assert Step.objects.get(workflow_id=succeeds.workflow_id).attempts == 3

    with pytest.raises(WorkflowFailed) as info:
        fails.result(timeout=5)
    assert info.value.error_type == "StepFailed"
    assert "attempt 4 of atomic-fails failed" in info.value.message
    assert not Effect.objects.filter(label="atomic-fails").exists()
    step = Step.objects.get(workflow_id=fails.workflow_id)
    assert (step.status, step.attempts) == (Step.Outcome.ERROR, 4)
