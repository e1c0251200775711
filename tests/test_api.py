"""The public API: starting workflows, handles, results, decorators and child ids."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from durable_streams import (
    DurableStreamsError,
    Status,
    WorkflowCancelled,
    WorkflowConflict,
    WorkflowFailed,
    WorkflowHandle,
    WorkflowNotFound,
    WorkflowTimeout,
    cancel_workflow,
    current_workflow_id,
    get_workflow,
    read_stream,
    start_workflow,
    step,
    workflow,
)
from durable_streams.exceptions import WorkflowNotRegistered
from durable_streams.models import Workflow
from durable_streams.worker import Worker
from tests import workflows
from tests.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

ECHO = "tests.workflows.echo"


# Starting


def test_start_enqueues_and_returns_a_handle(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.echo.start(1, "two", k={"x": None})

    assert isinstance(handle, WorkflowHandle)
    row = Workflow.objects.get(pk=handle.workflow_id)
    assert (row.name, row.status, row.queue, row.attempts) == (ECHO, Status.ENQUEUED, "default", 0)
    assert row.decoded_inputs == {"args": [1, "two"], "kwargs": {"k": {"x": None}}}
    assert row.max_attempts == 10
    assert handle.status == Status.ENQUEUED

    run_burst()
    assert handle.result(timeout=5) == {"args": [1, "two"], "kwargs": {"k": {"x": None}}}


def test_start_workflow_takes_the_workflow_or_its_name_and_options(
    run_burst: Callable[..., Worker],
) -> None:
    user = get_user_model().objects.create_user("owner")
    handle = start_workflow(
        workflows.echo, 7, workflow_id="mine", queue="other", owner=user, public=True, x=1
    )
    assert handle.workflow_id == "mine"
    row = Workflow.objects.get(pk="mine")
    assert (row.queue, row.owner_id, row.is_public) == ("other", user.pk, True)
    assert row.decoded_inputs == {"args": [7], "kwargs": {"x": 1}}

    by_name = start_workflow("tests.custom-name")
    assert by_name.get().queue == "other"

    run_burst(queues=["other"])
    assert handle.result(timeout=5) == {"args": [7], "kwargs": {"x": 1}}
    assert by_name.result(timeout=5) == "custom"


def test_start_workflow_refuses_what_is_not_a_workflow() -> None:
    with pytest.raises(TypeError, match="takes a @workflow function or its name, not function"):
        start_workflow(lambda: 1)  # type: ignore[arg-type]
    with pytest.raises(WorkflowNotRegistered, match="'no.such.workflow'"):
        start_workflow("no.such.workflow")
    assert not Workflow.objects.exists()


@pytest.mark.parametrize(
    ("workflow_id", "problem"),
    [
        ("", "non-empty string"),
        ("x" * 256, "at most 255"),
        (42, "non-empty string"),
        ("a\x00b", "NUL"),
        ("\ud800", "lone surrogates"),
    ],
)
def test_bad_workflow_ids_are_refused(workflow_id: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        start_workflow(workflows.echo, workflow_id=workflow_id)
    assert not Workflow.objects.exists()


def test_ids_no_workflow_can_have_are_refused_before_any_query() -> None:
    # On PostgreSQL a NUL in a query fails it with a DataError.
    for call in (get_workflow, cancel_workflow, lambda wid: read_stream(wid, "out")):
        with pytest.raises(ValueError, match="workflow_id must not contain NUL"):
            call("a\x00")
    with pytest.raises(ValueError, match="workflow_id must be a non-empty string"):
        get_workflow("")


def test_a_queue_longer_than_its_column_is_refused() -> None:
    # The queue column holds 100 characters.
    with pytest.raises(ValueError, match="at most 100 characters"):
        start_workflow(workflows.echo, queue="q" * 101)
    handle = start_workflow(workflows.echo, queue="q" * 100)
    assert handle.get().queue == "q" * 100


def test_an_existing_id_returns_that_run_and_never_runs_it_twice(
    run_burst: Callable[..., Worker],
) -> None:
    first = workflows.counted_once.using(workflow_id="same").start("dup")
    second = workflows.counted_once.using(workflow_id="same").start("dup")
    assert first == second
    assert Workflow.objects.count() == 1

    run_burst()
    assert first.result(timeout=5) == "dup"

    # Once ended, starting it again still gives the same run, which does not run again.
    third = workflows.counted_once.using(workflow_id="same").start("dup")
    assert third == first
    run_burst()
    assert third.result(timeout=5) == "dup"
    assert Effect.objects.filter(workflow_id="same").count() == 1
    assert Workflow.objects.count() == 1


def test_an_existing_id_inside_the_callers_transaction() -> None:
    # The failed insert must not break the caller's transaction (PostgreSQL aborts it).
    with transaction.atomic():
        workflows.echo.using(workflow_id="in-atomic").start()
        again = workflows.echo.using(workflow_id="in-atomic").start()
        assert again.status == Status.ENQUEUED
    assert Workflow.objects.filter(pk="in-atomic").count() == 1


def test_a_start_is_one_statement_inside_a_transaction_too() -> None:
    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        workflows.echo.using(workflow_id="one-statement").start()
        workflows.echo.using(workflow_id="one-statement").start()  # taken: then one look at it
    statements = [q["sql"] for q in queries.captured_queries]
    assert len(statements) == 3, statements
    assert not any("SAVEPOINT" in sql.upper() for sql in statements)
    assert Workflow.objects.filter(pk="one-statement").count() == 1


def test_a_different_workflow_under_an_existing_id_conflicts() -> None:
    workflows.echo.using(workflow_id="taken").start()
    with pytest.raises(WorkflowConflict) as info:
        workflows.custom.using(workflow_id="taken").start()
    assert "'taken'" in str(info.value)
    assert ECHO in str(info.value) and "tests.custom-name" in str(info.value)
    assert isinstance(info.value, DurableStreamsError)
    assert Workflow.objects.get(pk="taken").name == ECHO


def test_keyword_arguments_in_another_order_repeat_the_start() -> None:
    first = workflows.echo.using(workflow_id="order").start(1, a=1, b=[2.0, True])
    assert workflows.echo.using(workflow_id="order").start(1, b=[2.0, True], a=1) == first
    assert Workflow.objects.count() == 1


@pytest.mark.parametrize(
    ("again", "what"),
    [
        ({"args": (2,)}, "inputs"),
        ({"args": (1.0,)}, "inputs"),  # 1 and 1.0 are different JSON
        ({"args": (True,)}, "inputs"),
        ({"args": (1,), "kwargs": {"extra": None}}, "inputs"),
        ({"args": (1,), "public": True}, "public"),
        ({"args": (1,), "owner": "someone"}, "owner"),
        ({"args": (2,), "public": True}, "public, inputs"),
    ],
)
def test_an_existing_id_started_differently_conflicts(again: dict[str, Any], what: str) -> None:
    # An application that builds ids from user input handed one user's run to another.
    users = get_user_model().objects
    alice, someone = users.create_user("alice"), users.create_user("someone")
    first = start_workflow(workflows.echo, 1, workflow_id="shared", owner=alice)
    options = {"owner": someone if again.pop("owner", None) else alice, **again}
    args, kwargs = options.pop("args"), options.pop("kwargs", {})
    for in_transaction in (False, True):
        with pytest.raises(WorkflowConflict) as info:
            if in_transaction:
                with transaction.atomic():
                    start_workflow(workflows.echo, *args, workflow_id="shared", **options, **kwargs)
            else:
                start_workflow(workflows.echo, *args, workflow_id="shared", **options, **kwargs)
        message = str(info.value)
        assert f"'shared' is already used by a run of {ECHO!r} with a different {what};" in message
        assert "alice" not in message and "someone" not in message
    row = Workflow.objects.get()
    assert (row.pk, row.owner_id, row.is_public) == (first.workflow_id, alice.pk, False)
    assert row.decoded_inputs == {"args": [1], "kwargs": {}}
    # The identical start is still idempotent, by instance or by primary key.
    assert start_workflow(workflows.echo, 1, workflow_id="shared", owner=alice) == first
    assert start_workflow(workflows.echo, 1, workflow_id="shared", owner=alice.pk) == first


def test_an_anonymous_owner_is_no_owner() -> None:
    from django.contrib.auth.models import AnonymousUser

    handle = start_workflow(workflows.echo, owner=AnonymousUser(), public=True)
    assert handle.get().owner_id is None


@pytest.mark.parametrize("public", ["no", "yes", 1, 0, [], "False"])
def test_public_must_be_a_bool(public: Any) -> None:
    # bool("no") is True: the run was stored public.
    with pytest.raises(TypeError, match=r"public must be True or False, not "):
        start_workflow(workflows.echo, public=public)
    assert not Workflow.objects.exists()


def _bad_owners() -> list[tuple[Callable[[], Any], type[Exception], str]]:
    users = get_user_model()
    return [
        (lambda: users(username="unsaved"), ValueError, "owner must be a saved user"),
        (lambda: users(pk=987654, username="unsaved-with-pk"), ValueError, "never saved"),
        (lambda: 987654, ValueError, "owner is 987654, but no auth.User"),
        (lambda: "987654", ValueError, "owner is '987654', but no auth.User"),
        (lambda: "bob", TypeError, "'bob' cannot be one"),
        (lambda: 1.5, TypeError, "not float"),
        (lambda: True, TypeError, "not bool"),
        (lambda: object(), TypeError, "not object"),
        (lambda: Effect(label="x"), TypeError, "not a tests.Effect"),
    ]


@pytest.mark.parametrize(("make", "error", "fragment"), _bad_owners())
def test_a_bad_owner_is_refused_naming_owner_and_nothing_is_stored(
    make: Callable[[], Any], error: type[Exception], fragment: str
) -> None:
    # Django raised its own ValueError, or the INSERT failed at commit (IntegrityError).
    owner = make()
    for in_transaction in (False, True):
        with pytest.raises(error) as info:
            if in_transaction:
                with transaction.atomic():
                    start_workflow(workflows.echo, owner=owner)
            else:
                start_workflow(workflows.echo, owner=owner)
        assert str(info.value).startswith("owner ")
        assert fragment in str(info.value)
    assert not Workflow.objects.exists()


def test_arguments_nested_too_deeply_are_refused_naming_them() -> None:
    # A bare RecursionError before, naming neither the argument nor the workflow.
    deep = workflows.nested(100_000)
    with pytest.raises(ValueError, match=f"Argument 1 of workflow {ECHO!r} is nested too deeply"):
        workflows.echo.start(1, deep)
    with pytest.raises(ValueError, match=f"Argument 'tree' of workflow {ECHO!r} is nested too"):
        workflows.echo.start(tree={"a": deep})
    assert not Workflow.objects.exists()
    # Nesting that JSON handles is stored and comes back whole.
    handle = workflows.echo.start(workflows.nested(200))
    assert handle.get().decoded_inputs["args"][0] == workflows.nested(200)


def test_inputs_over_max_input_bytes_are_refused_and_nothing_is_stored() -> None:
    limit = 100
    # {"args":["…"],"kwargs":{}} is 25 bytes around the text.
    with override_settings(DURABLE_STREAMS={**settings.DURABLE_STREAMS, "MAX_INPUT_BYTES": limit}):
        handle = workflows.echo.start("x" * (limit - 25))
        assert len(handle.get().inputs.encode()) == limit
        with pytest.raises(ValueError) as info:
            workflows.echo.start("é" * (limit - 25))
    assert f"The inputs of workflow {ECHO!r} are {2 * limit - 25} bytes once encoded" in str(
        info.value
    )
    assert f"the limit is {limit} (settings.DURABLE_STREAMS['MAX_INPUT_BYTES'])" in str(info.value)
    assert Workflow.objects.count() == 1


def test_the_default_input_limit_is_one_mebibyte() -> None:
    with pytest.raises(ValueError, match="the limit is 1048576"):
        workflows.echo.start("x" * (50 * 1024 * 1024))
    assert not Workflow.objects.exists()


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("args", "kwargs", "fragments"),
    [
        ((object(),), {}, ["Argument 0 ", "type object"]),
        ((1, {1, 2}), {}, ["Argument 1 ", "type set"]),
        ((), {"when": float("nan")}, ["Argument 'when'", "type float"]),
        ((), {"d": {"ok": [1, {(1, 2): "tuple key"}]}}, ["Argument 'd'", "type tuple"]),
        ((_circular(),), {}, ["Argument 0 ", "Circular reference"]),
    ],
)
def test_arguments_that_are_not_json_raise_type_error_and_store_nothing(
    args: tuple[Any, ...], kwargs: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(TypeError) as info:
        workflows.echo.start(*args, **kwargs)
    message = str(info.value)
    for fragment in [*fragments, ECHO, "JSON-serializable"]:
        assert fragment in message
    assert not Workflow.objects.exists()


# Inspecting


def test_unknown_ids_raise_workflow_not_found() -> None:
    with pytest.raises(WorkflowNotFound, match="'nope'") as info:
        get_workflow("nope")
    assert info.value.workflow_id == "nope"
    assert isinstance(info.value, LookupError)
    with pytest.raises(WorkflowNotFound):
        WorkflowHandle("nope").result(timeout=1)
    with pytest.raises(WorkflowNotFound):
        cancel_workflow("nope")


def test_the_handle_reads_the_status_fresh(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.echo.start()
    same = get_workflow(handle.workflow_id)
    assert same == handle and hash(same) == hash(handle)
    assert handle.status == Status.ENQUEUED

    run_burst()
    assert handle.status == Status.SUCCESS
    assert same.get().status == Status.SUCCESS

    Workflow.objects.filter(pk=handle.workflow_id).update(status=Status.ERROR)
    assert handle.status == Status.ERROR


def test_result_returns_the_output(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.write_values.start("out", [1, 2, 3])
    run_burst()
    assert handle.result(timeout=5) == 3
    assert handle.result() == 3  # no timeout needed once ended


def test_result_raises_workflow_failed_with_the_original_error(
    run_burst: Callable[..., Worker],
) -> None:
    handle = workflows.fails.start("the reason")
    run_burst()
    with pytest.raises(WorkflowFailed) as info:
        handle.result(timeout=5)
    assert info.value.error_type == "ValueError"
    assert info.value.message == "the reason"
    assert info.value.workflow_id == handle.workflow_id
    assert "ValueError: the reason" in str(info.value)
    assert "Traceback" in handle.get().decoded_error["traceback"]


def test_a_workflow_result_that_is_not_json_fails_it(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.returns_object.start()
    run_burst()
    with pytest.raises(WorkflowFailed) as info:
        handle.result(timeout=5)
    assert info.value.error_type == "TypeError"
    assert "tests.workflows.returns_object" in info.value.message
    assert "type object" in info.value.message


def test_result_raises_workflow_cancelled(run_burst: Callable[..., Worker]) -> None:
    handle = workflows.counted_once.start("never")
    assert handle.cancel() is True
    assert handle.cancel() is False  # already ended
    run_burst()
    with pytest.raises(WorkflowCancelled, match=handle.workflow_id):
        handle.result(timeout=5)
    assert handle.status == Status.CANCELLED
    assert not Effect.objects.exists()


def test_result_times_out_while_the_workflow_waits() -> None:
    handle = workflows.echo.start()  # no worker runs it
    started = time.monotonic()
    with pytest.raises(WorkflowTimeout, match="did not end within 0.3 seconds") as info:
        handle.result(timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert isinstance(info.value, TimeoutError)


@pytest.mark.parametrize("timeout", ["1", -1, float("nan"), True])
def test_bad_result_timeouts_raise_at_the_call(timeout: Any) -> None:
    handle = workflows.echo.start()
    with pytest.raises(ValueError, match="timeout must be None or a number of seconds"):
        handle.result(timeout=timeout)


async def test_bad_aresult_timeouts_raise_at_the_call(async_db: None) -> None:
    handle = await sync_to_async(workflows.echo.start)()
    with pytest.raises(ValueError, match="timeout must be None or a number of seconds"):
        await handle.aresult(timeout=float("nan"))


def test_result_waits_for_a_running_workflow(worker_thread: Callable[..., Worker]) -> None:
    handle = workflows.slow_then_write.start(0.3)
    worker_thread()
    started = time.monotonic()
    assert handle.result(timeout=10) is None
    assert time.monotonic() - started >= 0.2
    assert handle.status == Status.SUCCESS


async def test_aresult_works_the_same_from_async_code(
    async_db: None, worker_thread: Callable[..., Worker]
) -> None:
    ok = await sync_to_async(workflows.slow_then_write.start)(0.2)
    failed = await sync_to_async(workflows.fails.start)("async reason")
    pending = await sync_to_async(workflows.on_other_queue.start)()
    await sync_to_async(worker_thread)()

    assert await ok.aresult(timeout=10) is None
    with pytest.raises(WorkflowFailed) as info:
        await failed.aresult(timeout=10)
    assert (info.value.error_type, info.value.message) == ("ValueError", "async reason")

    with pytest.raises(WorkflowTimeout):
        await pending.aresult(timeout=0.2)
    # The event loop stays free while aresult waits.
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        for _ in range(5):
            await asyncio.sleep(0.02)
            ticks += 1

    await asyncio.gather(tick(), _expect_timeout(pending, 0.3))
    assert ticks == 5

    await sync_to_async(pending.cancel)()
    with pytest.raises(WorkflowCancelled):
        await pending.aresult(timeout=5)


async def _expect_timeout(handle: WorkflowHandle, timeout: float) -> None:
    with pytest.raises(WorkflowTimeout):
        await handle.aresult(timeout=timeout)


# Decorators


def test_workflow_decorator_options(run_burst: Callable[..., Worker]) -> None:
    assert workflows.custom.name == "tests.custom-name"
    assert workflows.custom.queue == "other"
    assert workflows.custom.max_attempts == 2
    assert workflows.echo.name == ECHO
    assert workflows.echo(1, k=2) == {"args": [1], "kwargs": {"k": 2}}  # a plain call
    assert workflows.custom.__name__ == "custom"

    row = workflows.custom.start().get()
    assert (row.name, row.queue, row.max_attempts) == ("tests.custom-name", "other", 2)
    run_burst()
    row.refresh_from_db()
    assert row.status == Status.ENQUEUED  # the default queue's worker leaves it alone
    run_burst(queues=["other"])
    row.refresh_from_db()
    assert row.status == Status.SUCCESS


def test_max_attempts_defaults_to_the_setting() -> None:
    assert workflows.echo.max_attempts == 10
    with override_settings(DURABLE_STREAMS={"MAX_ATTEMPTS": 3}):
        assert workflows.echo.max_attempts == 3
        assert workflows.echo.start().get().max_attempts == 3


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"name": ""}, ValueError, "workflow name must be a non-empty string"),
        ({"name": "n" * 256}, ValueError, "at most 255"),
        ({"name": 5}, ValueError, "workflow name"),
        ({"name": "a\x00b"}, ValueError, "NUL"),
        ({"queue": ""}, ValueError, "workflow queue must be a non-empty string"),
        ({"queue": "q" * 101}, ValueError, "at most 100"),
        ({"max_attempts": 0}, ValueError, "max_attempts must be a whole number from 1 to 1000000"),
        ({"max_attempts": 2**31}, ValueError, "max_attempts must be a whole number from 1 to"),
        ({"max_attempts": True}, ValueError, "max_attempts"),
        ({"max_attempts": 1.5}, ValueError, "max_attempts"),
    ],
)
def test_bad_workflow_decorator_arguments(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):

        @workflow(**options)
        def never_registered() -> None:
            pass


def test_workflow_decorator_refuses_what_it_cannot_run() -> None:
    with pytest.raises(TypeError, match="decorates a function, not str"):
        workflow("tests.a-name")  # type: ignore[call-overload]

    with pytest.raises(TypeError, match="coroutine function"):

        @workflow
        async def coroutine_workflow() -> None:
            pass

    with pytest.raises(ValueError, match="already registered"):

        @workflow(name=ECHO)
        def impostor() -> None:
            pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries must be a whole number of at least 0"),
        ({"retries": True}, "retries"),
        ({"retries": 1.0}, "retries"),
        ({"backoff": -0.5}, "backoff must be a number of seconds of at least 0"),
        ({"backoff": "1"}, "backoff"),
        ({"name": ""}, "step name must be a non-empty string"),
    ],
)
def test_bad_step_decorator_arguments(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):

        @step(**options)
        def never_used() -> None:
            pass


def test_steps_outside_a_workflow_are_plain_calls() -> None:
    assert workflows.step_a() == "a"
    assert workflows.step_a.step_name == "tests.workflows.step_a"  # type: ignore[attr-defined]
    assert current_workflow_id() is None


# Child workflows


def test_a_child_started_from_a_workflow_body_gets_a_deterministic_id(
    run_burst: Callable[..., Worker],
) -> None:
    parent = workflows.parent.start(2)
    mixed = workflows.parent_after_write.start(2)
    run_burst()
    pid, mid = parent.workflow_id, mixed.workflow_id
    assert parent.result(timeout=5) == [f"{pid}-0", f"{pid}-1"]
    # Stream writes take operation numbers too.
    assert mixed.result(timeout=5) == [f"{mid}-1", f"{mid}-2"]
    for child_id in [f"{pid}-0", f"{pid}-1", f"{mid}-1", f"{mid}-2"]:
        assert get_workflow(child_id).status == Status.SUCCESS
    assert get_workflow(f"{pid}-1").result() == {"args": [1], "kwargs": {}}


def test_a_replayed_parent_finds_its_children_instead_of_starting_new_ones(
    run_burst: Callable[..., Worker],
) -> None:
    parent = workflows.parent.start(2)
    pid = parent.workflow_id
    # A previous run started the first child, with the inputs a replay gives it again,
    # then its worker died.
    first = start_workflow(workflows.echo, 0, workflow_id=f"{pid}-0")
    created = first.get().created_at
    run_burst()
    assert parent.result(timeout=5) == [f"{pid}-0", f"{pid}-1"]
    assert Workflow.objects.filter(name=ECHO).count() == 2
    assert first.get().created_at == created  # the same row, not a new one
    assert first.result() == {"args": [0], "kwargs": {}}


def test_a_parent_whose_child_id_holds_another_run_fails_with_a_conflict(
    run_burst: Callable[..., Worker],
) -> None:
    parent = workflows.parent.start(2)
    pid = parent.workflow_id
    # Someone else's run took the id the parent's first child derives.
    start_workflow(workflows.echo, "not the child", workflow_id=f"{pid}-0")
    run_burst()
    with pytest.raises(WorkflowFailed) as info:
        parent.result(timeout=5)
    assert info.value.error_type == "WorkflowConflict"
    assert "with a different inputs" in info.value.message
    assert get_workflow(f"{pid}-0").result() == {"args": ["not the child"], "kwargs": {}}
