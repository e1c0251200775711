"""The worker processes table: real workers record themselves, beat, and leave or are swept."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from durable_streams.models import Status, WorkerProcess, Workflow
from durable_streams.models import workers as worker_rows
from durable_streams.runtime import registry
from tests import workflows
from tests.processes import WorkerProcesses, worker_processes
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

BEAT = 0.3
WORKERS = reverse("admin:durable_streams_workerprocess_changelist")
CHANGELIST = reverse("admin:durable_streams_workflow_changelist")


@pytest.fixture
def fast_beats() -> Iterator[None]:
    # This process judges the rows with the workers' own interval.
    with override_settings(
        DURABLE_STREAMS={**settings.DURABLE_STREAMS, "WORKER_HEARTBEAT_SECONDS": BEAT}
    ):
        yield


@pytest.fixture
def processes(transactional_db: None, tmp_path: Path) -> Iterator[WorkerProcesses]:
    with worker_processes(tmp_path) as started:
        yield started


def _start(processes: WorkerProcesses, worker_id: str, **kwargs: Any) -> Any:
    return processes.start(
        worker_id, env_overrides={"DS_WORKER_HEARTBEAT_SECONDS": str(BEAT)}, **kwargs
    )


def _row(worker_id: str) -> WorkerProcess | None:
    return WorkerProcess.objects.filter(pk=worker_id).first()


def _status(*args: str) -> str:
    out = StringIO()
    call_command("durable_streams_status", *args, stdout=out)
    return out.getvalue()


def make_row(worker_id: str, *, age: float = 0.0, names: list[str] | None = None) -> WorkerProcess:
    row = WorkerProcess.objects.register(
        worker_id,
        hostname="host-a",
        pid=4242,
        process_started_at=timezone.now(),
        queues=["default", "emails"],
        concurrency=3,
        names=registry.names() if names is None else names,
    )
    if age:
        WorkerProcess.objects.filter(pk=worker_id).update(
            heartbeat_at=timezone.now() - timedelta(seconds=age)
        )
        row.refresh_from_db()
    return row


# Real worker processes


def test_a_worker_records_itself_beats_and_leaves_on_sigterm(
    processes: WorkerProcesses, fast_beats: None
) -> None:
    worker = _start(processes, "recorded", queues=["default", "emails"], concurrency=3)
    row = wait_until(lambda: _row("recorded"), timeout=10, what="the worker's row")
    assert row.queue_list == ["default", "emails"]
    assert row.concurrency == 3
    assert row.pid == worker.process.pid
    assert workflows.echo.name in row.workflow_names
    assert row.workflows_complete
    first = row.heartbeat_at
    wait_until(
        lambda: (r := _row("recorded")) is not None and r.heartbeat_at > first,
        timeout=10,
        what="a newer heartbeat",
    )
    assert WorkerProcess.objects.live().filter(pk="recorded").exists()

    worker.send(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()
    assert _row("recorded") is None


def test_a_killed_worker_is_presumed_gone_then_swept_by_another(
    processes: WorkerProcesses, fast_beats: None
) -> None:
    doomed = _start(processes, "doomed")
    wait_until(lambda: _row("doomed"), timeout=10, what="the worker's row")
    doomed.send(signal.SIGKILL)
    assert doomed.wait(10) == -signal.SIGKILL
    # Its row stays, and counts as gone once the heartbeat is old enough.
    wait_until(
        lambda: WorkerProcess.objects.gone().filter(pk="doomed").exists(),
        timeout=10,
        what="the killed worker to count as gone",
    )
    assert _row("doomed") is not None
    report = json.loads(_status("--json"))
    assert [w["worker_id"] for w in report["gone_workers"]] == ["doomed"]
    assert report["workers"] == []
    assert "Presumed gone" in _status()

    _start(processes, "survivor")
    wait_until(lambda: _row("doomed") is None, timeout=15, what="the gone row to be swept")
    assert _row("survivor") is not None
    assert "Removed 1 workers from the worker processes table" in processes.logs()


def test_the_unknown_workflow_warning_counts_the_names_of_other_live_workers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from durable_streams.worker import Worker

    Workflow.objects.create(name="elsewhere.known", inputs="{}", max_attempts=3)
    Workflow.objects.create(name="elsewhere.unknown", inputs="{}", max_attempts=3)
    make_row("other-worker", names=["elsewhere.known"])
    worker = Worker(worker_id="me")
    with caplog.at_level("WARNING", logger="durable_streams"):
        worker._warn_unknown(registry.names())
    warned = [r.getMessage() for r in caplog.records if "elsewhere" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "'elsewhere.unknown'" in warned[0]
    assert "no running worker has it registered" in warned[0]


# The table's queries


def test_sweep_deletes_only_gone_rows_in_bounded_batches(fast_beats: None) -> None:
    for i in range(5):
        make_row(f"old-{i}", age=60)
    make_row("fresh")
    assert WorkerProcess.objects.sweep(limit=2) == 2
    assert WorkerProcess.objects.count() == 4
    assert WorkerProcess.objects.sweep() == 3
    assert list(WorkerProcess.objects.values_list("pk", flat=True)) == ["fresh"]


def test_a_beat_after_a_sweep_says_so_and_register_replaces_a_row() -> None:
    assert WorkerProcess.objects.beat("nobody") is False
    make_row("again", age=60)
    assert WorkerProcess.objects.beat("again") is True
    make_row("again", names=["a.b"])
    assert WorkerProcess.objects.get(pk="again").workflow_names == ["a.b"]


def test_names_beyond_the_cap_are_cut_and_then_no_name_counts_as_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_rows, "NAMES_CHARS", 30)
    text, complete = worker_rows.encode_names(["b.two", "a.one", "c.three", "d.four"])
    assert len(text) <= 30
    assert not complete
    assert json.loads(text) == ["a.one", "b.two", "c.three"]
    make_row("small", names=["a.one"])
    assert WorkerProcess.objects.known_names() == {"a.one"}
    make_row("cut", names=["b.two", "a.one", "c.three", "d.four"])
    assert WorkerProcess.objects.known_names() is None


# durable_streams_status


def test_status_lists_live_workers_with_the_runs_they_hold(fast_beats: None) -> None:
    make_row("alive-1")
    make_row("gone-1", age=60)
    Workflow.objects.create(
        name=workflows.echo.name,
        inputs="{}",
        max_attempts=3,
        status=Status.RUNNING,
        attempts=1,
        lease_owner="alive-1",
        lease_expires_at=timezone.now() + timedelta(seconds=30),
    )
    report = json.loads(_status("--json"))
    (live,) = report["workers"]
    assert live["worker_id"] == "alive-1"
    assert (live["hostname"], live["pid"], live["concurrency"]) == ("host-a", 4242, 3)
    assert live["queues"] == ["default", "emails"]
    assert live["running"] == 1
    assert live["alive"] is True
    assert 0 <= live["heartbeat_age_seconds"] < 5
    assert [w["worker_id"] for w in report["gone_workers"]] == ["gone-1"]
    assert report["gone_workers"][0]["heartbeat_age_seconds"] >= 60
    assert report["unlisted_leases"] == []

    text = _status()
    assert "Live workers: 1" in text
    line = next(line for line in text.splitlines() if line.startswith("alive-1"))
    assert "host-a" in line and "4242" in line and "default,emails" in line
    assert "s ago" in line
    assert "Presumed gone (no heartbeat for 0.9s" in text
    assert any(line.startswith("gone-1") for line in text.splitlines())


def test_status_says_when_no_worker_is_alive() -> None:
    assert "No live worker" in _status()
    assert json.loads(_status("--json"))["workers"] == []


# The admin


def test_worker_changelist_renders_read_only(admin_client: Client, fast_beats: None) -> None:
    make_row("listed-worker")
    make_row("stale-worker", age=60)
    response = admin_client.get(WORKERS)
    assert response.status_code == 200
    html = response.content.decode()
    assert "listed-worker" in html and "host-a" in html
    assert "presumed gone" in html
    assert reverse("admin:durable_streams_workerprocess_add") not in html
    assert 'name="action"' not in html  # no delete action
    change = reverse("admin:durable_streams_workerprocess_change", args=["listed-worker"])
    page = admin_client.get(change)
    assert page.status_code == 200
    assert 'type="submit"' not in page.content.decode().split('id="content-main"')[1]
    assert admin_client.post(change, {"hostname": "x"}).status_code == 403
    add = reverse("admin:durable_streams_workerprocess_add")
    assert admin_client.get(add).status_code == 403
    delete = reverse("admin:durable_streams_workerprocess_delete", args=["listed-worker"])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert _row("listed-worker") is not None


def test_worker_changelist_needs_the_view_permission(client: Client) -> None:
    user = User.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get(WORKERS).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_workerprocess"))
    assert client.get(WORKERS).status_code == 200


def _enqueued(name: str) -> Workflow:
    return Workflow.objects.create(name=name, inputs="{}", max_attempts=3)


def test_enqueued_runs_no_live_worker_knows_are_marked(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    make_row("w1", names=[workflows.echo.name])
    unknown = _enqueued("myapp.defined_elsewhere")
    known = _enqueued(workflows.echo.name)
    for _ in range(20):
        _enqueued(workflows.echo.name)
        _enqueued("myapp.defined_elsewhere")
    with django_assert_max_num_queries(9):
        response = admin_client.get(CHANGELIST)
    rows = {run.pk: run for run in response.context["cl"].result_list}
    assert rows[unknown.pk].unknown_workflow is True
    assert rows[known.pk].unknown_workflow is False
    html = response.content.decode()
    assert html.count("No running worker knows this workflow") == 21

    page = admin_client.get(reverse("admin:durable_streams_workflow_change", args=[unknown.pk]))
    assert "No running worker knows this workflow" in page.content.decode()
    assert "workflows.py" in page.content.decode()
    page = admin_client.get(reverse("admin:durable_streams_workflow_change", args=[known.pk]))
    assert "No running worker knows this workflow" not in page.content.decode()


def test_nothing_is_marked_when_the_page_has_no_enqueued_run(admin_client: Client) -> None:
    Workflow.objects.create(
        name="myapp.defined_elsewhere",
        inputs="{}",
        max_attempts=3,
        status=Status.ERROR,
        finished_at=timezone.now(),
    )
    response = admin_client.get(CHANGELIST)
    assert "No running worker knows this workflow" not in response.content.decode()
    # With no live worker at all, an enqueued run is marked whatever its name.
    _enqueued(workflows.echo.name)
    response = admin_client.get(CHANGELIST)
    assert response.content.decode().count("No running worker knows this workflow") == 1
