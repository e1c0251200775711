"""durable_streams.testing: run a workflow to its end inside a test."""

from __future__ import annotations

import pytest

from durable_streams import (
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowTimeout,
    close_stream,
    step,
    workflow,
    write_stream,
)
from durable_streams.exceptions import NotInWorkflow
from durable_streams.models import Status, Step
from durable_streams.testing import run_workflow
from tests.workflows import echo

pytestmark = pytest.mark.django_db(transaction=True)


@step
def shout(word: str) -> str:
    return word.upper()


@workflow
def summarize(words: list[str]) -> str:
    parts = []
    for word in words:
        token = shout(word)
        write_stream("tokens", token)
        parts.append(token)
    close_stream("tokens")
    write_stream("progress", {"done": len(parts)})
    return " ".join(parts)


@workflow
def breaks(message: str) -> None:
    write_stream("tokens", "partial")
    raise KeyError(message)


@workflow
def waits_for_nobody() -> str:
    # A child on a queue that no registered workflow uses: nothing here runs it.
    child = echo.using(queue="unserved").start("x")
    return str(child.result())


@workflow
def starts_children(count: int) -> list[str]:
    return [str(echo.start(i).result(timeout=20)) for i in range(count)]


def test_a_run_returns_its_output_and_streams() -> None:
    run = run_workflow(summarize, ["a", "b", "c"])
    assert run.status == Status.SUCCESS
    assert run.output == "A B C"
    assert run.result() == "A B C"
    assert run.streams == {"tokens": ["A", "B", "C"], "progress": [{"done": 3}]}
    assert run.error is None
    # Durably, as on a worker: each step is checkpointed.
    assert Step.objects.filter(workflow_id=run.workflow_id).count() == 3


def test_a_failed_run_carries_its_error() -> None:
    run = run_workflow(breaks, "no such thing")
    assert run.status == Status.ERROR
    assert run.output is None
    assert run.error is not None
    assert run.error["type"] == "KeyError"
    assert "no such thing" in run.error["message"]
    assert run.streams == {"tokens": ["partial"]}
    with pytest.raises(WorkflowFailed) as failed:
        run.result()
    assert failed.value.error_type == "KeyError"


def test_children_run_too() -> None:
    run = run_workflow(starts_children, 3)
    assert run.status == Status.SUCCESS
    assert len(run.output) == 3


def test_a_run_that_would_wait_forever_fails_within_the_timeout() -> None:
    with pytest.raises(WorkflowTimeout, match="did not end within 2 seconds"):
        run_workflow(waits_for_nobody, timeout=2)
    run = run_workflow(echo, "after")  # the next run is not held up
    assert run.status == Status.SUCCESS


def test_the_timed_out_run_is_cancelled() -> None:
    from durable_streams.models import Workflow as WorkflowRun

    with pytest.raises(WorkflowTimeout):
        run_workflow(waits_for_nobody, timeout=1)
    parent = WorkflowRun.objects.get(name=waits_for_nobody.name)
    assert parent.status == Status.CANCELLED
    with pytest.raises(WorkflowCancelled):
        from durable_streams import get_workflow

        get_workflow(parent.pk).result(timeout=0)


def test_start_options_are_passed_on() -> None:
    run = run_workflow(echo, 1, workflow_id="chosen-id", public=True)
    assert run.workflow_id == "chosen-id"


def test_run_workflow_refuses_a_plain_function() -> None:
    with pytest.raises(TypeError, match="takes a @workflow function, not function"):
        run_workflow(lambda: None)  # type: ignore[arg-type]


def test_calling_a_workflow_directly_has_no_streams() -> None:
    # Documented: a direct call runs the body without durability, so writes refuse.
    with pytest.raises(NotInWorkflow):
        summarize(["a"])
