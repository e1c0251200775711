"""Start options bound with using(), every keyword passed through, arguments checked at start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from durable_streams import Status, start_workflow, workflow
from durable_streams.models import Workflow
from durable_streams.runtime import registry
from durable_streams.testing import run_workflow
from durable_streams.worker import Worker
from tests import workflows

pytestmark = pytest.mark.django_db(transaction=True)

ECHO = "tests.workflows.echo"


# start() passes every keyword argument to the function


def test_start_passes_a_keyword_named_like_an_option_to_the_function(
    run_burst: Callable[..., Worker],
) -> None:
    # It was taken as the queue option, and the function never saw it.
    handle = workflows.greet.start("bob", queue="email")

    row = handle.get()
    assert row.queue == "default"
    assert row.decoded_inputs == {"args": ["bob"], "kwargs": {"queue": "email"}}
    run_burst()
    assert handle.result(timeout=5) == {"name": "bob", "queue": "email"}


def test_start_passes_every_option_name_as_an_argument() -> None:
    handle = workflows.echo.start(1, workflow_id="w", queue="q", owner="someone", public=True)

    row = handle.get()
    assert row.decoded_inputs == {
        "args": [1],
        "kwargs": {"workflow_id": "w", "queue": "q", "owner": "someone", "public": True},
    }
    assert (row.queue, row.owner_id, row.is_public) == ("default", None, False)
    assert row.id != "w"


# using()


def test_using_binds_the_options_of_a_start(run_burst: Callable[..., Worker]) -> None:
    alice = get_user_model().objects.create_user("alice")
    bound = workflows.echo.using(queue="q", workflow_id="bound-id", owner=alice, public=True)

    handle = bound.start(1, k=2)

    row = handle.get()
    assert (row.id, row.queue, row.owner_id, row.is_public) == ("bound-id", "q", alice.pk, True)
    assert row.decoded_inputs == {"args": [1], "kwargs": {"k": 2}}
    # The same id and inputs again: the same run, as with start_workflow.
    assert bound.start(1, k=2) == handle
    run_burst(queues=["q"])
    assert handle.result(timeout=5) == {"args": [1], "kwargs": {"k": 2}}


def test_using_returns_a_copy_and_leaves_the_workflow_unchanged() -> None:
    users = get_user_model().objects
    alice = users.create_user("alice")
    bound = workflows.echo.using(queue="q", public=True)
    rebound = bound.using(owner=alice, public=False)

    assert bound is not workflows.echo and rebound is not bound
    assert isinstance(bound, type(workflows.echo))
    assert bound.name == rebound.name == ECHO
    assert registry.get(ECHO) is workflows.echo  # the copies are not registered
    assert repr(workflows.echo) == f"<Workflow {ECHO}>"
    assert repr(bound) == f"<Workflow {ECHO} using queue='q', public=True>"

    plain = workflows.echo.start().get()
    once = bound.start().get()
    twice = rebound.start().get()
    assert (plain.queue, plain.owner_id, plain.is_public) == ("default", None, False)
    assert (once.queue, once.owner_id, once.is_public) == ("q", None, True)
    # An option left out keeps what the copy it was called on had bound.
    assert (twice.queue, twice.owner_id, twice.is_public) == ("q", alice.pk, False)


@pytest.mark.parametrize("option", ["priority", "run_after", "timeout", "deduplication_id"])
def test_using_refuses_an_option_it_does_not_know(option: str) -> None:
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{option}'"):
        workflows.echo.using(**{option: 1})
    assert not Workflow.objects.exists()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"queue": ""}, ValueError, "A workflow queue must be a non-empty string"),
        ({"queue": "q" * 101}, ValueError, "at most 100 characters"),
        ({"queue": 5}, ValueError, "A workflow queue must be a non-empty string"),
        ({"queue": "a\x00b"}, ValueError, "queue must not contain NUL"),
        ({"workflow_id": ""}, ValueError, "workflow_id must be a non-empty string"),
        ({"workflow_id": "x" * 256}, ValueError, "at most 255 characters"),
        ({"workflow_id": "a\x00"}, ValueError, "workflow_id must not contain NUL"),
        ({"owner": object()}, TypeError, "owner must be a .* or its primary key, not object"),
        ({"owner": 1.5}, TypeError, "owner must be a .* or its primary key, not float"),
        ({"public": "yes"}, TypeError, "public must be True or False, not 'yes'"),
        ({"public": 1}, TypeError, "public must be True or False, not 1"),
    ],
)
def test_using_checks_each_option_when_it_is_bound(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    # using() itself raises: a bad option never waits for the start to be found.
    with pytest.raises(error, match=message):
        workflows.echo.using(**options)


def test_an_unsaved_owner_is_refused_by_using() -> None:
    unsaved = get_user_model()(username="unsaved")
    with pytest.raises(ValueError, match="owner must be a saved user"):
        workflows.echo.using(owner=unsaved)


def test_an_owner_given_by_primary_key_is_looked_up_at_start() -> None:
    bound = workflows.echo.using(owner=987654)  # the type is right; no query yet
    with pytest.raises(ValueError, match="no .* has that primary key"):
        bound.start()
    assert not Workflow.objects.exists()
    user = get_user_model().objects.create_user("late", id=987654)
    assert bound.start().get().owner_id == user.pk


# start_workflow(), kept for compatibility


def test_start_workflow_takes_options_out_of_the_keywords_over_those_bound() -> None:
    handle = start_workflow(workflows.echo, 1, queue="q", workflow_id="sw", public=True, k=2)
    row = handle.get()
    assert (row.id, row.queue, row.is_public) == ("sw", "q", True)
    assert row.decoded_inputs == {"args": [1], "kwargs": {"k": 2}}

    bound = workflows.echo.using(queue="q", public=True, workflow_id="bound")
    row = start_workflow(bound, workflow_id="given").get()
    assert (row.id, row.queue, row.is_public) == ("given", "q", True)
    row = start_workflow(bound, public=False, workflow_id="private").get()
    assert (row.id, row.queue, row.is_public) == ("private", "q", False)


def test_start_workflow_refuses_a_workflow_with_a_parameter_named_like_an_option() -> None:
    for wf in (workflows.greet, "tests.workflows.greet", workflows.greet.using(queue="q")):
        with pytest.raises(TypeError, match=r"parameter 'queue' has the name of a start_workflow"):
            start_workflow(wf, "bob")
    with pytest.raises(TypeError, match=r"greet\.using\(\.\.\.\)\.start\(\.\.\.\)"):
        start_workflow(workflows.greet, "bob", queue="email")
    assert not Workflow.objects.exists()


def test_start_workflow_refuses_keyword_only_option_parameters_but_not_positional_only() -> None:
    @workflow(name="tests.options.keyword-only-owner")
    def keyword_only(*, owner: str) -> str:
        return owner

    @workflow(name="tests.options.positional-only-public")
    def positional_only(public: bool, /) -> bool:
        return public

    with pytest.raises(TypeError, match=r"parameter 'owner'"):
        start_workflow(keyword_only, owner="x")
    assert not Workflow.objects.exists()
    # No keyword can reach a positional-only parameter: public= is the option.
    row = start_workflow(positional_only, False, public=True).get()
    assert row.is_public is True
    assert row.decoded_inputs == {"args": [False], "kwargs": {}}


# Arguments checked against the function's signature at start


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (lambda: workflows.summarize.start(), "missing a required argument: 'text'"),
        (lambda: workflows.summarize.start("a", "b"), "too many positional arguments"),
        (lambda: workflows.summarize.start(txt="a"), "missing a required argument: 'text'"),
        (lambda: workflows.summarize.start("a", txt="b"), "unexpected keyword argument 'txt'"),
        (lambda: workflows.summarize.using(queue="q").start(), "missing a required argument"),
        (lambda: start_workflow(workflows.summarize), "missing a required argument: 'text'"),
        (lambda: start_workflow("tests.workflows.summarize", 1, 2), "too many positional"),
        (lambda: workflows.greet.start(queue="email"), "missing a required argument: 'name'"),
        (lambda: workflows.custom.start(1), "too many positional arguments"),
    ],
)
def test_arguments_the_function_cannot_take_are_refused_and_nothing_is_stored(
    start: Callable[[], Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message) as info:
        start()
    assert "cannot start with these arguments" in str(info.value)
    assert not Workflow.objects.exists()


def test_a_child_started_with_bad_arguments_raises_in_the_body_and_is_not_stored(
    run_burst: Callable[..., Worker],
) -> None:
    parent = workflows.parent_with_bad_child.start()
    run_burst()

    result = parent.result(timeout=5)
    assert "Workflow 'tests.workflows.summarize' cannot start" in result["error"]
    assert "missing a required argument: 'text'" in result["error"]
    # The refused start took no operation number: the next child has the first one.
    assert result["next_child"] == f"{parent.workflow_id}-0"
    assert not Workflow.objects.filter(name="tests.workflows.summarize").exists()
    assert set(Workflow.objects.values_list("name", "status")) == {
        ("tests.workflows.parent_with_bad_child", Status.SUCCESS),
        (ECHO, Status.SUCCESS),
    }


# run_workflow()


def test_run_workflow_passes_keywords_to_the_function_and_takes_bound_options() -> None:
    run = run_workflow(workflows.greet.using(queue="side"), "bob")
    assert run.output == {"name": "bob", "queue": "no queue given"}
    assert Workflow.objects.get(pk=run.workflow_id).queue == "side"

    # An option name among the keywords keeps run_workflow's old meaning, so it is
    # refused for a workflow that has such a parameter, as start_workflow refuses it.
    with pytest.raises(TypeError, match=r"parameter 'queue'"):
        run_workflow(workflows.greet, "ann", queue="email")
    assert Workflow.objects.count() == 1
