"""The admin: changelist, workflow page, paginated history, and the operator actions."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.db import DEFAULT_DB_ALIAS, connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from durable_streams.admin import actions as ds_actions
from durable_streams.admin import display as ds_display
from durable_streams.admin import filters as ds_filters
from durable_streams.admin import pages as ds_pages
from durable_streams.bus import publish_changes
from durable_streams.models import Status, Step, Stream, StreamEntry, Workflow
from tests import workflows
from tests.models import Effect
from tests.processes import wait_until

CHANGELIST = reverse("admin:durable_streams_workflow_changelist")

# Factories: rows as a worker leaves them, without running one.


def make_workflow(
    status: str = Status.SUCCESS,
    *,
    name: str = "tests.workflows.echo",
    queue: str = "default",
    owner: User | None = None,
    age: timedelta = timedelta(0),
    **fields: Any,
) -> Workflow:
    created = timezone.now() - age
    values: dict[str, Any] = {
        "name": name,
        "status": status,
        "queue": queue,
        "owner": owner,
        "inputs": json.dumps({"args": [1, "two"], "kwargs": {"flag": True}}),
        "max_attempts": 3,
        "attempts": 0 if status == Status.ENQUEUED else 1,
        "created_at": created,
    }
    if status != Status.ENQUEUED:
        values["started_at"] = created + timedelta(seconds=1)
    if status == Status.RUNNING:
        values["lease_owner"] = "host-1-worker"
        values["lease_expires_at"] = timezone.now() + timedelta(minutes=5)
    if status in (Status.SUCCESS, Status.ERROR, Status.CANCELLED):
        values["finished_at"] = created + timedelta(seconds=3, milliseconds=500)
    if status == Status.SUCCESS:
        values["output"] = json.dumps({"answer": 42})
    if status == Status.ERROR:
        values["error"] = json.dumps(
            {
                "type": "ValueError",
                "message": "the disk <is> full",
                "traceback": 'Traceback (most recent call last):\n  File "x.py"\nValueError',
            }
        )
    values.update(fields)
    return Workflow.objects.create(**values)


def make_stream(workflow: Workflow, key: str, count: int, *, closed: bool = False) -> Stream:
    now = timezone.now()
    stream = Stream.objects.create(
        workflow=workflow, key=key, length=count, closed_at=now if closed else None
    )
    StreamEntry.objects.bulk_create(
        StreamEntry(stream=stream, offset=i, value=json.dumps({"i": i}), operation=i)
        for i in range(count)
    )
    return stream


def make_steps(workflow: Workflow, count: int) -> None:
    now = timezone.now()
    Step.objects.bulk_create(
        Step(
            workflow=workflow,
            operation=i,
            name=f"tests.workflows.step_{i}",
            status=Step.Outcome.SUCCESS,
            output=json.dumps(f"result {i}"),
            started_at=now,
            finished_at=now + timedelta(milliseconds=120),
        )
        for i in range(count)
    )


def page_url(workflow: Workflow) -> str:
    return reverse("admin:durable_streams_workflow_change", args=[workflow.pk])


def act_url(workflow: Workflow, action: str) -> str:
    return reverse("admin:durable_streams_workflow_act", args=[workflow.pk, action])


def stream_url(workflow: Workflow, stream: Stream) -> str:
    return reverse("admin:durable_streams_workflow_stream", args=[workflow.pk, stream.pk])


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


@pytest.fixture
def operator(db: None) -> Callable[..., Client]:
    """A logged-in staff user holding exactly the given workflow permissions."""
    created = 0

    def make(*codenames: str) -> Client:
        nonlocal created
        created += 1
        user = User.objects.create_user(f"operator{created}", password="x", is_staff=True)
        user.user_permissions.set(
            Permission.objects.filter(
                content_type__app_label="durable_streams", codename__in=codenames
            )
        )
        client = Client()
        client.force_login(user)
        return client

    return make


# The changelist


def test_changelist_shows_the_columns_newest_first(admin_client: Client) -> None:
    owner = User.objects.create_user("ada")
    old = make_workflow(Status.ERROR, name="tests.workflows.fails", age=timedelta(hours=2))
    new = make_workflow(Status.RUNNING, owner=owner, queue="fast", attempts=2)
    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.index(new.pk[:8]) < html.index(old.pk[:8])
    assert '<span class="ds-badge ds-badge-running">Running</span>' in html
    assert '<span class="ds-badge ds-badge-error">Error</span>' in html
    assert f'title="{new.pk}"' in html
    for text in ("ada", "fast", "2/3", "host-1-worker", "2.5 s"):
        assert text in html
    headers = [h["text"] for h in response.context["result_headers"]]
    assert [str(h).lower() for h in headers[1:]] == [
        "id",
        "name",
        "status",
        "queue",
        "owner",
        "created",
        "duration",
        "attempts",
        "worker",
    ]
    assert "2 workflows" in html


def test_changelist_filters(admin_client: Client) -> None:
    done = make_workflow(Status.SUCCESS, name="tests.workflows.echo")
    failed = make_workflow(Status.ERROR, name="tests.workflows.fails", queue="slow")
    ancient = make_workflow(Status.SUCCESS, name="tests.workflows.echo", age=timedelta(days=40))

    def listed(query: dict[str, str]) -> set[str]:
        response = admin_client.get(CHANGELIST, query)
        assert response.status_code == 200
        return {w.pk for w in response.context["cl"].result_list}

    assert listed({"status__exact": "ERROR"}) == {failed.pk}
    assert listed({"name": "tests.workflows.echo"}) == {done.pk, ancient.pk}
    assert listed({"queue": "slow"}) == {failed.pk}
    since = (timezone.now() - timedelta(days=7)).isoformat()
    assert listed({"created_at__gte": since}) == {done.pk, failed.pk}
    html = admin_client.get(CHANGELIST).content.decode()
    # The name and queue filters offer the values present.
    assert "?name=tests.workflows.fails" in html and "?queue=slow" in html


def test_name_and_queue_filters_list_at_most_the_limit(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ds_filters, "FILTER_VALUES", 2)
    for name in ("c.third", "a.first", "b.second", "a.first"):
        make_workflow(name=name)
    html = admin_client.get(CHANGELIST).content.decode()
    assert "?name=a.first" in html and "?name=b.second" in html
    assert "?name=c.third" not in html


def test_changelist_search_by_id_and_name(admin_client: Client) -> None:
    one = make_workflow(name="billing.charge_card")
    two = make_workflow(name="mail.send_digest", id="digest-2026-11")

    def found(term: str) -> set[str]:
        response = admin_client.get(CHANGELIST, {"q": term})
        return {w.pk for w in response.context["cl"].result_list}

    assert found(one.pk) == {one.pk}
    assert found(one.pk[:8]) == {one.pk}
    assert found("digest-2026") == {two.pk}
    assert found("CHARGE") == {one.pk}
    assert found("nothing-like-this") == set()


@pytest.mark.parametrize("rows", [5, 50])
def test_changelist_queries_do_not_grow_with_rows(
    admin_client: Client, django_assert_max_num_queries: Any, rows: int
) -> None:
    for i in range(rows):
        owner = User.objects.create_user(f"owner{i}")
        make_workflow([Status.SUCCESS, Status.RUNNING, Status.ERROR][i % 3], owner=owner)
    # Session, user, count, rows, and the two filters that list values: never one per row.
    with django_assert_max_num_queries(8):
        response = admin_client.get(CHANGELIST)
    assert len(response.context["cl"].result_list) == rows


def test_changelist_counts_no_further_than_the_limit(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ds_pages, "COUNT_LIMIT", 3)
    for _ in range(5):
        make_workflow()
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(CHANGELIST)
    html = response.content.decode()
    assert "More than 3 workflows" in html
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 4" in sql for sql in counts), counts
    # The JSON columns are never read for the list.
    listing = [q["sql"] for q in queries.captured_queries if '"inputs"' in q["sql"]]
    assert listing == []


def test_anonymous_users_are_sent_to_log_in(client: Client, db: None) -> None:
    response = client.get(CHANGELIST)
    assert response.status_code == 302 and "/login/" in response["Location"]


# The workflow page


def test_workflow_page_shows_inputs_output_error_steps_and_streams(admin_client: Client) -> None:
    workflow = make_workflow(Status.ERROR)
    make_steps(workflow, 3)
    Step.objects.create(
        workflow=workflow,
        operation=3,
        name="tests.workflows.flaky",
        status=Step.Outcome.ERROR,
        error=json.dumps({"type": "ConnectionError", "message": "refused", "traceback": "TB"}),
        attempts=3,
        started_at=timezone.now(),
        finished_at=timezone.now(),
    )
    closed = make_stream(workflow, "progress", 3, closed=True)
    opened = make_stream(workflow, "tokens", 25)
    response = admin_client.get(page_url(workflow))
    assert response.status_code == 200
    html = response.content.decode()
    # Inputs and output as indented JSON; the error with its traceback, escaped.
    assert "&quot;kwargs&quot;: {\n    &quot;flag&quot;: true\n  }" in html
    assert "<strong>ValueError</strong>: the disk &lt;is&gt; full" in html
    assert "Traceback (most recent call last)" in html
    # Steps in operation order, with output previews and the failed one's error.
    positions = [html.index(f"tests.workflows.step_{i}<") for i in range(3)]
    assert positions == sorted(positions)
    assert "&quot;result 1&quot;" in html
    assert "<strong>ConnectionError</strong>: refused" in html
    # Streams: key, state, length, and only the tail of the long one.
    assert 'data-key="tokens"\n       data-next-offset="25" data-open="true"' in html
    assert 'data-key="progress"\n       data-next-offset="3" data-open="false"' in html
    rows = response.context["streams"]
    assert [p.stream.pk for p in rows] == [closed.pk, opened.pk]
    assert [e.offset for e in rows[1].entries] == list(range(15, 25))
    assert "15 earlier ones" in html
    assert stream_url(workflow, opened) in html


def json_url(workflow: Workflow, field: str) -> str:
    return reverse("admin:durable_streams_workflow_json", args=[workflow.pk, field])


def test_workflow_page_shows_large_inputs_output_and_error_cut_with_a_download(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    # A 50 MB argument made a 52 MB page: the page now carries a few KB of each.
    big = "x" * (5 * 1024 * 1024)
    inputs = json.dumps({"args": [big], "kwargs": {}})
    output = json.dumps({"answer": big})
    error = json.dumps({"type": "MemoryError", "message": big, "traceback": "TB"})
    workflow = make_workflow(Status.ERROR, inputs=inputs, output=output, error=error)
    with django_assert_max_num_queries(12) as queries:
        response = admin_client.get(page_url(workflow))
    assert response.status_code == 200
    # No query reads a column whole.
    assert not any(big[:1000] in str(q["sql"]) for q in queries.captured_queries)
    html = response.content.decode()
    assert len(html) < 200_000
    limit = ds_display.DETAIL_CHARS
    assert response.context["inputs_json"] == inputs[:limit]
    assert response.context["output_json"] == output[:limit]
    assert "<strong>MemoryError</strong>" in html
    assert html.count("characters, as stored.") == 3
    assert f"The first {limit:,} of {len(inputs):,} characters" in html
    for field in ("inputs", "output", "error"):
        assert f'href="{json_url(workflow, field)}" download' in html

    whole = admin_client.get(json_url(workflow, "inputs"))
    assert whole.status_code == 200
    assert whole["Content-Type"] == "application/json; charset=utf-8"
    assert whole["Content-Disposition"] == f'attachment; filename="{workflow.pk}-inputs.json"'
    assert whole.content.decode() == inputs
    assert admin_client.get(json_url(workflow, "error")).content.decode() == error


def test_small_inputs_output_and_error_are_shown_whole_without_a_download(
    admin_client: Client,
) -> None:
    workflow = make_workflow(Status.ERROR, output=json.dumps([1, 2]))
    html = admin_client.get(page_url(workflow)).content.decode()
    assert "characters, as stored." not in html
    assert json_url(workflow, "inputs") not in html
    assert "the disk &lt;is&gt; full" in html


def test_the_download_needs_the_view_permission(
    operator: Callable[..., Client], admin_client: Client
) -> None:
    workflow = make_workflow(Status.ENQUEUED)
    assert operator().get(json_url(workflow, "inputs")).status_code == 403
    viewer = operator("view_workflow")
    assert viewer.get(json_url(workflow, "inputs")).status_code == 200
    # No output yet, a field that is none of the three, a workflow that does not exist.
    assert viewer.get(json_url(workflow, "output")).status_code == 404
    assert viewer.get(json_url(workflow, "lease_owner")).status_code == 404
    missing = reverse("admin:durable_streams_workflow_json", args=["nope", "inputs"])
    assert viewer.get(missing).status_code == 404
    logged_out = Client()
    assert logged_out.get(json_url(workflow, "inputs")).status_code == 302


@pytest.mark.parametrize("size", [3, 30])
def test_workflow_page_queries_do_not_grow_with_history(
    admin_client: Client, django_assert_max_num_queries: Any, size: int
) -> None:
    workflow = make_workflow(Status.RUNNING, owner=User.objects.create_user("bo"))
    make_steps(workflow, size)
    for i in range(size):
        make_stream(workflow, f"s{i:02d}", size)
    make_workflow(Status.ERROR, retry_of=workflow)
    with django_assert_max_num_queries(12):
        response = admin_client.get(page_url(workflow))
    assert response.status_code == 200
    assert len(response.context["steps"]) == size
    assert len(response.context["streams"]) == min(size, ds_display.PAGE_STREAMS)


def test_workflow_page_links_retries_both_ways(admin_client: Client) -> None:
    original = make_workflow(Status.ERROR)
    retry = make_workflow(Status.RUNNING, retry_of=original)
    assert page_url(retry) in admin_client.get(page_url(original)).content.decode()
    assert page_url(original) in admin_client.get(page_url(retry)).content.decode()


def test_stream_entries_are_paginated_by_offset(admin_client: Client) -> None:
    workflow = make_workflow(Status.RUNNING)
    stream = make_stream(workflow, "tokens", 1_000)
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(stream_url(workflow, stream), {"offset": 900})
    assert response.status_code == 200
    assert [e.offset for e in response.context["entries"]] == list(range(900, 1000))
    html = response.content.decode()
    assert "Offsets 900–999 of 1,000" in html
    assert "?offset=800" in html and "?offset=0" in html
    # Every read of the entries is bounded by offset: the stream is never loaded whole.
    reads = [q["sql"] for q in queries.captured_queries if "streamentry" in q["sql"]]
    bounded = f"{connection.ops.quote_name('offset')} <"
    assert reads and all(bounded in sql for sql in reads), reads
    first = admin_client.get(stream_url(workflow, stream))
    assert [e.offset for e in first.context["entries"]][:2] == [0, 1]
    assert len(first.context["entries"]) == ds_display.ENTRIES_PER_PAGE


def test_stream_entries_show_big_values_cut(admin_client: Client) -> None:
    workflow = make_workflow(Status.SUCCESS)
    stream = Stream.objects.create(workflow=workflow, key="big", length=3)
    big = json.dumps("x" * 10_000)
    medium = json.dumps({"a": [1, 2], "text": "y" * 100}, separators=(",", ":"))
    StreamEntry.objects.create(stream=stream, offset=0, value=big)
    StreamEntry.objects.create(stream=stream, offset=1, value='{"a":[1,2]}', operation=None)
    StreamEntry.objects.create(stream=stream, offset=2, value=medium)
    response = admin_client.get(stream_url(workflow, stream))
    entries = response.context["entries"]
    assert entries[0].cut and entries[0].more == len(big) - ds_display.VALUE_CHARS
    assert len(entries[0].value) == ds_display.VALUE_CHARS
    # Short values stay on one line as stored; longer ones are indented.
    assert entries[1].value == '{"a":[1,2]}'
    assert entries[2].value.startswith('{\n  "a": [\n    1,\n    2\n  ],\n  "text": "yyy')
    assert "6,002 more characters" in response.content.decode()


@pytest.mark.parametrize("offset", ["-1", "abc", "1000", "²", "١", "1²"])
def test_stream_entries_refuse_a_bad_offset(admin_client: Client, offset: str) -> None:
    workflow = make_workflow()
    stream = make_stream(workflow, "out", 10)
    response = admin_client.get(stream_url(workflow, stream), {"offset": offset})
    assert response.status_code == 400
    assert f"offset must be a whole number from 0 to 9, not {offset!r}" in response.content.decode()


@pytest.mark.parametrize("offset", ["²", "9" * 5000, "0" * 5000])
def test_both_history_pages_refuse_offsets_int_cannot_read(
    admin_client: Client, offset: str
) -> None:
    # "²" passes str.isdigit() and 5,000 digits pass it too: int() then raised, a 500.
    workflow = make_workflow()
    stream = make_stream(workflow, "out", 10)
    make_steps(workflow, 3)
    steps_url = reverse("admin:durable_streams_workflow_steps", args=[workflow.pk])
    for url in (stream_url(workflow, stream), steps_url):
        response = admin_client.get(url, {"offset": offset})
        assert response.status_code == 400
        text = response.content.decode()
        assert "offset must be a whole number from 0 to" in text
        assert len(text) < 200  # the refusal does not echo 5,000 digits


@pytest.mark.parametrize(
    "params",
    [{"q": "a\x00"}, {"name": "a\x00"}, {"queue": "\x00"}, {"status": "x\x00"}, {"id": "\x00"}],
)
def test_changelist_refuses_parameters_holding_nul(
    admin_client: Client, params: dict[str, str]
) -> None:
    # PostgreSQL failed the filter's query with a DataError: a 500.
    make_workflow()
    response = admin_client.get(CHANGELIST, params)
    assert response.status_code == 400
    assert "must not contain NUL characters" in response.content.decode()
    assert admin_client.get(CHANGELIST, {"q": "a"}).status_code == 200


def test_an_id_holding_nul_is_no_workflow(admin_client: Client) -> None:
    make_workflow()
    base = "/admin/durable_streams/workflow/a%00/"
    for suffix in ("steps/", "streams/1/"):
        assert admin_client.get(base + suffix).status_code == 404, suffix
    # Django's own pages send a missing object back to the index.
    for suffix in ("change/", "history/"):
        assert admin_client.get(base + suffix).status_code == 302, suffix
    assert admin_client.get(base + "delete/").status_code == 403  # nothing is deleted here
    assert admin_client.post(base + "act/cancel/").status_code == 404


def test_stream_of_another_workflow_is_not_found(admin_client: Client) -> None:
    mine, other = make_workflow(), make_workflow()
    stream = make_stream(other, "out", 1)
    assert admin_client.get(stream_url(mine, stream)).status_code == 404
    missing = reverse("admin:durable_streams_workflow_stream", args=["no-such-id", stream.pk])
    assert admin_client.get(missing).status_code == 404


def test_steps_are_paginated(admin_client: Client) -> None:
    workflow = make_workflow(Status.RUNNING)
    make_steps(workflow, 130)
    page = admin_client.get(page_url(workflow))
    assert len(page.context["steps"]) == ds_display.PAGE_STEPS
    steps_url = reverse("admin:durable_streams_workflow_steps", args=[workflow.pk])
    assert steps_url in page.content.decode()
    response = admin_client.get(steps_url, {"offset": 100})
    assert [s.operation for s in response.context["steps"]] == list(range(100, 130))
    assert "Steps 101–130 of 130" in response.content.decode()


def test_history_cannot_be_edited(admin_client: Client) -> None:
    workflow = make_workflow(Status.ERROR)
    assert admin_client.get(reverse("admin:durable_streams_workflow_add")).status_code == 403
    delete = reverse("admin:durable_streams_workflow_delete", args=[workflow.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert admin_client.post(page_url(workflow), {"name": "changed"}).status_code == 403
    assert Workflow.objects.get(pk=workflow.pk).name == workflow.name
    page = admin_client.get(page_url(workflow)).content.decode()
    assert 'name="_save"' not in page
    actions = admin_client.get(CHANGELIST).context["action_form"].fields["action"].choices
    assert "delete_selected" not in {name for name, _ in actions}
    # Steps and stream entries have no admin pages of their own.
    for model in ("step", "stream", "streamentry"):
        assert admin_client.get(f"/admin/durable_streams/{model}/").status_code == 404


# Actions


def post_action(client: Client, action: str, workflows: list[Workflow]) -> Any:
    return client.post(
        CHANGELIST,
        {"action": action, "_selected_action": [w.pk for w in workflows], "index": 0},
        follow=True,
    )


def statuses(*rows: Workflow) -> list[str]:
    return [Workflow.objects.get(pk=row.pk).status for row in rows]


def test_cancel_action(operator: Callable[..., Client]) -> None:
    client = operator("view_workflow", "cancel_workflow")
    running, queued, done = (
        make_workflow(Status.RUNNING),
        make_workflow(Status.ENQUEUED),
        make_workflow(Status.SUCCESS),
    )
    stream = make_stream(running, "out", 2)
    response = post_action(client, "cancel_selected", [running, queued, done])
    assert statuses(running, queued, done) == [Status.CANCELLED, Status.CANCELLED, Status.SUCCESS]
    stream.refresh_from_db()
    assert stream.closed_at is not None and stream.closed_by_end
    assert messages_of(response) == [
        "Cancelled 2 workflows.",
        f"1 workflow was not cancelled: it had already ended ({done.pk[:8]}…).",
    ]
    assert LogEntry.objects.filter(object_id=running.pk, change_message="Cancelled 2 workflows.")


def test_resume_action(operator: Callable[..., Client]) -> None:
    client = operator("view_workflow", "resume_workflow")
    failed, cancelled, running = (
        make_workflow(Status.ERROR, attempts=3),
        make_workflow(Status.CANCELLED),
        make_workflow(Status.RUNNING),
    )
    stream = make_stream(cancelled, "out", 2)
    Stream.objects.filter(pk=stream.pk).update(closed_at=timezone.now(), closed_by_end=True)
    response = post_action(client, "resume_selected", [failed, cancelled, running])
    assert statuses(failed, cancelled, running) == [
        Status.ENQUEUED,
        Status.ENQUEUED,
        Status.RUNNING,
    ]
    failed.refresh_from_db()
    assert (failed.attempts, failed.error, failed.finished_at) == (0, None, None)
    stream.refresh_from_db()
    assert stream.closed_at is None and stream.length == 2
    assert messages_of(response) == [
        "Resumed 2 workflows: they are back in the queue.",
        "1 workflow was not resumed: only failed or cancelled workflows can be "
        f"({running.pk[:8]}…).",
    ]


def test_retry_action(operator: Callable[..., Client]) -> None:
    client = operator("view_workflow", "retry_workflow")
    owner = User.objects.create_user("cy")
    failed = make_workflow(Status.ERROR, owner=owner, queue="slow", is_public=True)
    done = make_workflow(Status.SUCCESS)
    response = post_action(client, "retry_selected", [failed, done])
    retry = Workflow.objects.get(retry_of=failed)
    assert retry.pk != failed.pk and retry.status == Status.ENQUEUED
    assert (retry.name, retry.inputs, retry.queue, retry.owner_id, retry.is_public) == (
        failed.name,
        failed.inputs,
        "slow",
        owner.pk,
        True,
    )
    assert not Workflow.objects.filter(retry_of=done).exists()
    assert statuses(failed) == [Status.ERROR]
    assert messages_of(response) == [
        "Retried 1 workflow from scratch as a new run.",
        f"1 workflow was not retried: only failed or cancelled workflows can be ({done.pk[:8]}…).",
    ]


@pytest.mark.parametrize("action", ["cancel_selected", "resume_selected", "retry_selected"])
def test_actions_need_their_permission(operator: Callable[..., Client], action: str) -> None:
    others = {"cancel_selected": "resume_workflow", "resume_selected": "retry_workflow"}
    client = operator("view_workflow", others.get(action, "cancel_workflow"))
    running, failed = make_workflow(Status.RUNNING), make_workflow(Status.ERROR)
    offered = client.get(CHANGELIST).context["action_form"].fields["action"].choices
    assert action not in {name for name, _ in offered}
    response = post_action(client, action, [running, failed])
    assert statuses(running, failed) == [Status.RUNNING, Status.ERROR]
    assert Workflow.objects.count() == 2
    assert "No action selected." in messages_of(response)


def test_workflow_page_buttons_follow_state_and_permissions(
    operator: Callable[..., Client],
) -> None:
    running, failed = make_workflow(Status.RUNNING), make_workflow(Status.ERROR)
    everything = operator("view_workflow", "cancel_workflow", "resume_workflow", "retry_workflow")
    page = everything.get(page_url(running)).content.decode()
    assert act_url(running, "cancel") in page
    assert act_url(running, "resume") not in page and act_url(running, "retry") not in page
    page = everything.get(page_url(failed)).content.decode()
    assert act_url(failed, "resume") in page and act_url(failed, "retry") in page
    assert act_url(failed, "cancel") not in page
    viewer = operator("view_workflow")
    assert "formaction=" not in viewer.get(page_url(running)).content.decode()


def test_workflow_page_actions(operator: Callable[..., Client]) -> None:
    client = operator("view_workflow", "cancel_workflow", "resume_workflow", "retry_workflow")
    workflow = make_workflow(Status.RUNNING)
    response = client.post(act_url(workflow, "cancel"), follow=True)
    assert response.redirect_chain == [(page_url(workflow), 302)]
    assert messages_of(response) == ["Cancelled 1 workflow."]
    assert statuses(workflow) == [Status.CANCELLED]
    # Cancelling again is refused, and says why.
    response = client.post(act_url(workflow, "cancel"), follow=True)
    assert messages_of(response) == [
        f"1 workflow was not cancelled: it had already ended ({workflow.pk[:8]}…)."
    ]
    response = client.post(act_url(workflow, "resume"), follow=True)
    assert statuses(workflow) == [Status.ENQUEUED]
    assert messages_of(response) == ["Resumed 1 workflow: it is back in the queue."]
    Workflow.objects.filter(pk=workflow.pk).update(status=Status.ERROR)
    response = client.post(act_url(workflow, "retry"), follow=True)
    retry = Workflow.objects.get(retry_of=workflow)
    assert response.redirect_chain == [(page_url(retry), 302)]


def test_workflow_page_actions_are_guarded(operator: Callable[..., Client]) -> None:
    workflow = make_workflow(Status.RUNNING)
    viewer = operator("view_workflow", "resume_workflow", "retry_workflow")
    assert viewer.post(act_url(workflow, "cancel")).status_code == 403
    assert viewer.get(act_url(workflow, "cancel")).status_code == 405
    assert viewer.post(act_url(workflow, "explode")).status_code == 404
    stranger = operator("cancel_workflow")
    assert stranger.post(act_url(workflow, "cancel")).status_code == 403
    assert statuses(workflow) == [Status.RUNNING]


# The transitions, end to end with a worker


def test_resume_replays_a_failed_run_without_writing_twice(run_burst: Any) -> None:
    handle = workflows.fails.start("boom")
    run_burst()
    assert handle.status == Status.ERROR
    resumed, changes = Workflow.objects.filter(pk=handle.workflow_id).resume()
    assert resumed == [handle.workflow_id]
    assert changes.resumed == (handle.workflow_id,)
    publish_changes(changes, DEFAULT_DB_ALIAS)
    row = handle.get()
    assert (row.status, row.attempts, row.error) == (Status.ENQUEUED, 0, None)
    run_burst()
    # The body failed again, but its one recorded write was skipped by the replay.
    assert handle.status == Status.ERROR
    stream = Stream.objects.get(workflow_id=handle.workflow_id)
    assert list(stream.entries.values_list("value", flat=True)) == ['"before"']


def test_resume_runs_again_the_step_that_failed_the_run(run_burst: Any) -> None:
    handle = workflows.retrying.start("r", 3)
    run_burst()
    assert handle.status == Status.ERROR
    assert Effect.objects.filter(label="r").count() == 3
    publish_changes(Workflow.objects.filter(pk=handle.workflow_id).resume()[1], DEFAULT_DB_ALIAS)
    run_burst()
    assert handle.result(timeout=5) == "r ok"
    assert Effect.objects.filter(label="r").count() == 4


def test_retry_runs_from_scratch_as_a_new_workflow(run_burst: Any) -> None:
    handle = workflows.retrying.start("s", 3)
    run_burst()
    [(original, new_id)], changes = Workflow.objects.filter(pk=handle.workflow_id).retry()
    assert changes.queues == (Workflow.objects.get(pk=handle.workflow_id).queue,)
    publish_changes(changes, DEFAULT_DB_ALIAS)
    assert original == handle.workflow_id
    run_burst()
    retry = Workflow.objects.get(pk=new_id)
    assert (retry.status, retry.retry_of_id) == (Status.SUCCESS, handle.workflow_id)
    assert json.loads(retry.output) == "s ok"
    assert handle.status == Status.ERROR


def test_cancel_then_resume_finishes_every_step_and_value_once(live_worker: Any) -> None:
    handle = workflows.steady.start(8, 0.05)
    wait_until(
        lambda: StreamEntry.objects.filter(stream__workflow_id=handle.workflow_id).count() >= 3,
        timeout=10,
        what="three values",
    )
    assert ds_actions.cancel_all(Workflow.objects.filter(pk=handle.workflow_id)).changed
    stream = Stream.objects.get(workflow_id=handle.workflow_id)
    assert stream.closed_by_end
    assert ds_actions.resume_all(Workflow.objects.filter(pk=handle.workflow_id)).changed
    assert handle.result(timeout=20) == 8
    values = [
        json.loads(v) for v in stream.entries.order_by("offset").values_list("value", flat=True)
    ]
    assert values == list(range(8))
    labels = list(
        Effect.objects.filter(workflow_id=handle.workflow_id).values_list("label", flat=True)
    )
    assert sorted(labels) == sorted(f"step-{i}" for i in range(8))


def test_a_large_step_error_is_cut_on_the_workflow_and_steps_pages(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    big = "y" * (2 * 1024 * 1024)
    workflow = make_workflow(Status.ERROR)
    Step.objects.create(
        workflow=workflow,
        operation=0,
        name="tests.workflows.flaky",
        status=Step.Outcome.ERROR,
        error=json.dumps({"type": "OverflowError", "message": big, "traceback": big}),
        attempts=1,
        started_at=timezone.now(),
        finished_at=timezone.now(),
    )
    steps_url = reverse("admin:durable_streams_workflow_steps", args=[workflow.pk])
    for url in (page_url(workflow), steps_url):
        with django_assert_max_num_queries(14) as queries:
            response = admin_client.get(url)
        assert response.status_code == 200
        assert not any(big[:1000] in str(q["sql"]) for q in queries.captured_queries)
        html = response.content.decode()
        assert len(html) < 200_000, url
        assert "<strong>OverflowError</strong>: the error record is longer than" in html


def test_waiting_runs_show_their_wait_and_have_a_filter(admin_client: Client) -> None:
    until = timezone.now() + timedelta(hours=2)
    waiting = make_workflow(Status.WAITING, wait_operation=3, wait_topic="review", wake_at=until)
    sleeping = make_workflow(Status.WAITING, wait_operation=1, wake_at=until)
    make_workflow(Status.SUCCESS)
    response = admin_client.get(CHANGELIST, {"status__exact": "WAITING"})
    assert {w.pk for w in response.context["cl"].result_list} == {waiting.pk, sleeping.pk}
    html = response.content.decode()
    assert "ds-badge-waiting" in html and "?status__exact=WAITING" in html
    page = admin_client.get(page_url(waiting)).content.decode()
    assert "Current wait" in page and "Waiting for a message on topic" in page
    assert "review" in page and " until " in page
    page = admin_client.get(page_url(sleeping)).content.decode()
    assert "Sleeping until" in page
    done = admin_client.get(page_url(make_workflow(Status.SUCCESS))).content.decode()
    assert "Current wait" not in done
