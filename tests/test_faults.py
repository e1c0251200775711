"""A failing database statement of the library stops and replays a run; it never ends it.

The workflow's own code meeting a database error in a step is the step's failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import OperationalError
from django.utils import timezone

from durable_streams import Status, encoding
from durable_streams.models import Step, StepQuerySet, Workflow, WorkflowQuerySet
from durable_streams.runtime.execution import Execution
from durable_streams.worker import Worker
from tests import workflows_faults
from tests.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)


def labels(prefix: str) -> list[str]:
    return sorted(Effect.objects.filter(label__startswith=prefix).values_list("label", flat=True))


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> dict[str, int]:
    """Make ``owner.name`` raise a database error on its first call only."""
    original = getattr(owner, name)
    calls = {"failed": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        if not calls["failed"]:
            calls["failed"] += 1
            raise OperationalError("server closed the connection unexpectedly")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def ends_in_success(handle: Any, attempts: int) -> Workflow:
    run = handle.get()
    assert run.status == Status.SUCCESS, run.error
    assert run.attempts == attempts
    return run


def replayed_once(
    run_burst: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
    handle: Any,
    owner: Any,
    name: str,
) -> Workflow:
    """Run ``handle``'s workflow with ``owner.name`` failing once: the failed attempt is
    replayed, and the second one succeeds."""
    calls = fail_once(monkeypatch, owner, name)
    run_burst()
    assert calls["failed"] == 1
    return ends_in_success(handle, attempts=2)


@pytest.fixture
def no_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    # held_step waits for the test only in the lock test.
    monkeypatch.setattr(workflows_faults, "wait_for_effect", lambda label: True)


def test_a_failed_checkpoint_replays_the_run_instead_of_ending_it(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch, no_gate: None
) -> None:
    handle = workflows_faults.two_steps.start("ckpt")
    run = replayed_once(run_burst, monkeypatch, handle, StepQuerySet, "checkpoint")
    assert run.decoded_output == ["ckpt-first", "ckpt-second"]
    # Step 0 ran again (its checkpoint was lost), step 1 once.
    assert labels("ckpt-") == [
        "ckpt-returned",
        "ckpt-returned",
        "ckpt-second",
        "ckpt-started",
        "ckpt-started",
    ]


def recorded_first_step(handle: Any) -> None:
    """What a first run recorded before its worker died: step 0's checkpoint."""
    now = timezone.now()
    Step.objects.create(
        workflow_id=handle.workflow_id,
        operation=0,
        name=workflows_faults.held_step.step_name,
        status=Step.Outcome.SUCCESS,
        output=encoding.dumps("recorded"),
        started_at=now,
        finished_at=now,
    )


def test_a_failed_history_load_replays_the_run(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch, no_gate: None
) -> None:
    handle = workflows_faults.two_steps.start("hist")
    recorded_first_step(handle)
    run = replayed_once(run_burst, monkeypatch, handle, WorkflowQuerySet, "history")
    assert run.decoded_output == ["recorded", "hist-second"]
    assert labels("hist-") == ["hist-second"]


def test_a_failed_replay_read_replays_the_run(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch, no_gate: None
) -> None:
    handle = workflows_faults.two_steps.start("replay")
    recorded_first_step(handle)
    manager = type(Step.objects.using("default"))
    replayed_once(run_burst, monkeypatch, handle, manager, "get")


def test_a_failed_end_replays_the_run(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch, no_gate: None
) -> None:
    handle = workflows_faults.two_steps.start("end")
    run = replayed_once(run_burst, monkeypatch, handle, WorkflowQuerySet, "finish_held")
    assert run.decoded_output == ["end-first", "end-second"]
    # The replay met both checkpoints: no step ran twice.
    assert labels("end-") == ["end-returned", "end-second", "end-started"]


def test_a_failed_fence_of_an_atomic_step_replays_the_run(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = workflows_faults.atomic_then_step.start("atomic")
    replayed_once(run_burst, monkeypatch, handle, Execution, "fence")
    # The failed attempt's transaction rolled back its effect and its stream value.
    assert labels("atomic") == ["atomic", "atomic-second"]
    assert list(
        Workflow.objects.get(pk=handle.workflow_id)
        .streams.get(key="out")
        .entries.values_list("value", flat=True)
    ) == [encoding.dumps("atomic")]


def test_a_failed_child_start_replays_the_parent(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = workflows_faults.starts_a_child.start("parent")
    run = replayed_once(run_burst, monkeypatch, handle, WorkflowQuerySet, "enqueue")
    child_id = run.decoded_output[0]
    assert Workflow.objects.get(pk=child_id).status == Status.SUCCESS


def test_a_database_error_of_the_steps_own_code_is_the_steps_failure(
    run_burst: Callable[..., Worker],
) -> None:
    # Its retry succeeds: the run goes on, in its first attempt.
    retried = workflows_faults.own_database_error.start("own-once", 1)
    # Every try fails: the step fails and so does the workflow, without a replay.
    failing = workflows_faults.own_database_error.start("own-always", 5)
    run_burst()
    run = ends_in_success(retried, attempts=1)
    assert run.decoded_output == "own-once"
    assert Step.objects.get(workflow_id=retried.workflow_id).attempts == 2
    run = failing.get()
    assert run.status == Status.ERROR and run.attempts == 1
    assert run.decoded_error["type"] == "StepFailed"
    assert "the step's own query failed" in run.decoded_error["message"]
    assert labels("own-always") == ["own-always", "own-always"]


@pytest.fixture
def worker_lock_timeout(db_vendor: str) -> Any:
    """New connections of this process give up on a row lock after 1 s (lock_timeout)."""
    if db_vendor != "postgresql":
        pytest.skip("lock_timeout is a PostgreSQL setting")
    from django.db import connections

    options = connections["default"].settings_dict.setdefault("OPTIONS", {})
    before = options.get("options")
    options["options"] = "-c lock_timeout=1000"
    yield
    if before is None:
        options.pop("options", None)
    else:
        options["options"] = before


def test_a_checkpoint_that_times_out_on_a_row_lock_is_replayed(
    worker_lock_timeout: None, worker_thread: Callable[..., Worker]
) -> None:
    import time

    import psycopg
    from django.db import connection

    from tests.waiting import wait_until

    handle = workflows_faults.two_steps.start("locked")
    wid = handle.workflow_id
    worker_thread(concurrency=1)
    wait_until(lambda: labels("locked-started"), timeout=20, what="step 0 to start")
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("options", None)  # the test's own session waits as long as it must
    with psycopg.connect(**params) as holder:
        holder.execute(f"SELECT id FROM {Workflow._meta.db_table} WHERE id = %s FOR UPDATE", [wid])
        Effect.objects.create(workflow_id=wid, label="locked-locked")
        wait_until(lambda: labels("locked-returned"), timeout=20, what="step 0 to return")
        # The checkpoint's fence waits for the row lock, and gives up after 1 s.
        time.sleep(1.6)
        holder.rollback()
    wait_until(lambda: handle.get().is_terminal, timeout=30, what="the workflow to end")
    run = ends_in_success(handle, attempts=2)
    assert run.decoded_output == ["locked-first", "locked-second"]
    assert labels("locked-second") == ["locked-second"]


# Readers and result waiters ride out a failing database for READER_RETRY_SECONDS.


def flaky_reads(monkeypatch: pytest.MonkeyPatch, failures: int, every: int = 2) -> dict[str, int]:
    """The readers' queries fail ``failures`` times, one call in ``every``, as in a restart."""
    from durable_streams.models import StreamEntryQuerySet

    state = {"calls": 0, "failed": 0}
    original = StreamEntryQuerySet.texts_from

    def texts_from(self: Any, stream_id: int, offset: int, limit: int) -> Any:
        state["calls"] += 1
        if state["failed"] < failures and (state["calls"] - 1) % every == 0:
            state["failed"] += 1
            raise OperationalError("terminating connection due to administrator command")
        return original(self, stream_id, offset, min(limit, 2))  # small batches: many reads

    monkeypatch.setattr(StreamEntryQuerySet, "texts_from", texts_from)
    return state


def test_a_reader_reconnects_and_resumes_from_its_offset(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    from durable_streams import read_stream
    from tests import workflows

    handle = workflows.write_values.start("out", list(range(9)))
    run_burst()
    state = flaky_reads(monkeypatch, failures=4)
    assert list(read_stream(handle.workflow_id, "out")) == list(range(9))
    assert state["failed"] == 4


async def test_an_async_reader_reconnects_and_resumes_from_its_offset(
    async_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgiref.sync import sync_to_async

    from durable_streams import aread_stream
    from tests import workflows

    handle = await sync_to_async(workflows.write_values.start)("out", list(range(9)))
    await sync_to_async(lambda: Worker(burst=True).run())()
    state = flaky_reads(monkeypatch, failures=4)
    assert [value async for value in aread_stream(handle.workflow_id, "out")] == list(range(9))
    assert state["failed"] == 4


def test_a_reader_gives_up_after_reader_retry_seconds(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    import time

    from durable_streams import DatabaseUnavailable, DurableStreamsError, read_stream
    from tests import workflows

    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "READER_RETRY_SECONDS": 0.5}
    handle = workflows.write_values.start("out", [1, 2])
    run_burst()
    flaky_reads(monkeypatch, failures=10**6, every=1)
    began = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match="READER_RETRY_SECONDS") as raised:
        list(read_stream(handle.workflow_id, "out"))
    assert 0.5 <= time.monotonic() - began < 5
    assert isinstance(raised.value, DurableStreamsError)
    assert isinstance(raised.value.__cause__, OperationalError)


def test_a_result_waiter_reconnects(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    from durable_streams import WorkflowHandle
    from tests import workflows

    handle = workflows.echo.start("waited")
    run_burst()
    calls = {"failed": 0}
    outcome = WorkflowHandle._outcome

    def failing(self: WorkflowHandle) -> Any:
        if calls["failed"] < 3:
            calls["failed"] += 1
            raise OperationalError("the database system is starting up")
        return outcome(self)

    monkeypatch.setattr(WorkflowHandle, "_outcome", failing)
    assert handle.result(timeout=10) == {"args": ["waited"], "kwargs": {}}
    assert calls["failed"] == 3
