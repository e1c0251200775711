"""The operator's commands: durable_streams_status and durable_streams_prune."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from durable_streams.conf import get_config
from durable_streams.exceptions import ConfigurationError
from durable_streams.models import Status, Step, Stream, StreamEntry
from durable_streams.models import Workflow as WorkflowRun
from tests import workflows

pytestmark = pytest.mark.django_db(transaction=True)


def _run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def _row(status: str, queue: str = "default", **fields: Any) -> WorkflowRun:
    return WorkflowRun.objects.create(
        name="tests.anything", queue=queue, inputs="{}", max_attempts=3, status=status, **fields
    )


# durable_streams_status


def test_status_counts_queues_runs_and_workers() -> None:
    now = timezone.now()
    lease = timedelta(seconds=get_config().LEASE_SECONDS)
    _row(Status.ENQUEUED, created_at=now - timedelta(seconds=120))
    _row(Status.ENQUEUED)
    _row(Status.ENQUEUED, queue="emails")
    _row(
        Status.RUNNING,
        lease_owner="host-a-1",
        lease_expires_at=now + lease - timedelta(seconds=2),
        attempts=1,
    )
    _row(
        Status.RUNNING,
        queue="emails",
        lease_owner="host-b-2",
        lease_expires_at=now - timedelta(seconds=30),
        attempts=1,
    )
    _row(Status.SUCCESS, finished_at=now)
    _row(Status.ERROR, finished_at=now)
    _row(Status.WAITING, wait_operation=1, wait_topic="")

    report = json.loads(_run("durable_streams_status", "--json"))
    assert report["statuses"] == {
        "ENQUEUED": 3,
        "RUNNING": 2,
        "WAITING": 1,
        "SUCCESS": 1,
        "ERROR": 1,
        "CANCELLED": 0,
    }
    assert report["queues"]["default"]["enqueued"] == 2
    assert report["queues"]["default"]["running"] == 1
    assert report["queues"]["emails"] == {
        "enqueued": 1,
        "running": 1,
        "oldest_enqueued": report["queues"]["emails"]["oldest_enqueued"],
    }
    # These workers hold leases but have no row in the worker processes table.
    assert report["workers"] == []
    workers = {w["worker_id"]: w for w in report["unlisted_leases"]}
    assert workers["host-a-1"]["alive"] is True
    assert workers["host-a-1"]["running"] == 1
    assert workers["host-b-2"]["alive"] is False

    text = _run("durable_streams_status")
    assert "Runs: 3 enqueued, 2 running, 1 waiting, 1 success, 1 error, 0 cancelled" in text
    default_line = next(line for line in text.splitlines() if line.startswith("default "))
    assert default_line.split()[1:3] == ["2", "1"]
    assert re.search(r" 12[0-2]s ago$", default_line)
    assert "host-a-1" in text
    assert re.search(
        r" [2-4]s ago$", next(line for line in text.splitlines() if "host-a-1" in line)
    )
    assert "lease expired: its runs will be resumed" in next(
        line for line in text.splitlines() if "host-b-2" in line
    )


def test_status_of_an_empty_database() -> None:
    text = _run("durable_streams_status")
    assert "No queue has enqueued or running runs." in text
    assert "No live worker" in text


# durable_streams_prune


def _ended_run(run_burst: Any, days_ago: float) -> str:
    handle = workflows.write_values.start("out", [1, 2, 3])
    run_burst()
    ended = timezone.now() - timedelta(days=days_ago)
    WorkflowRun.objects.filter(pk=handle.workflow_id).update(
        created_at=ended - timedelta(seconds=1), finished_at=ended
    )
    return handle.workflow_id


def test_prune_deletes_old_ended_runs_with_their_history(run_burst: Any) -> None:
    old = [_ended_run(run_burst, days_ago=40) for _ in range(3)]
    recent = _ended_run(run_burst, days_ago=1)
    waiting = workflows.echo.start("not run")  # enqueued, never ended: kept whatever its age
    WorkflowRun.objects.filter(pk=waiting.workflow_id).update(
        created_at=timezone.now() - timedelta(days=90)
    )
    retry = _row(Status.ENQUEUED, retry_of_id=old[0])

    out = _run("durable_streams_prune", "--older-than", "30", "--batch-size", "2")

    assert "Deleted 3 runs" in out and "with 9 stream values" in out
    assert not WorkflowRun.objects.filter(pk__in=old).exists()
    assert not Stream.objects.filter(workflow_id__in=old).exists()
    assert not StreamEntry.objects.filter(stream__workflow_id__in=old).exists()
    assert not Step.objects.filter(workflow_id__in=old).exists()
    assert WorkflowRun.objects.filter(pk=recent).exists()
    assert StreamEntry.objects.filter(stream__workflow_id=recent).count() == 3
    assert WorkflowRun.objects.filter(pk=waiting.workflow_id).exists()
    retry.refresh_from_db()
    assert retry.retry_of_id is None


def test_prune_dry_run_deletes_nothing(run_burst: Any) -> None:
    old = _ended_run(run_burst, days_ago=10)
    out = _run("durable_streams_prune", "--older-than", "5", "--dry-run")
    assert out.startswith("1 runs ended before")
    assert WorkflowRun.objects.filter(pk=old).exists()


def test_prune_uses_retention_days(run_burst: Any, settings: Any) -> None:
    old = _ended_run(run_burst, days_ago=10)
    kept = _ended_run(run_burst, days_ago=3)
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "RETENTION_DAYS": 7}
    _run("durable_streams_prune")
    assert not WorkflowRun.objects.filter(pk=old).exists()
    assert WorkflowRun.objects.filter(pk=kept).exists()


def test_prune_needs_an_age() -> None:
    with pytest.raises(CommandError, match="--older-than DAYS, or"):
        call_command("durable_streams_prune")


@pytest.mark.parametrize("value", ["-1", "ten", "nan", "1e400"])
def test_prune_refuses_a_bad_age(value: str) -> None:
    with pytest.raises(CommandError, match="older-than"):
        call_command("durable_streams_prune", "--older-than", value)


@pytest.mark.parametrize("value", [-1, "7", 10**6, float("inf")])
def test_retention_days_is_validated(settings: Any, value: Any) -> None:
    settings.DURABLE_STREAMS = {"RETENTION_DAYS": value}
    with pytest.raises(ConfigurationError, match="RETENTION_DAYS"):
        get_config()
