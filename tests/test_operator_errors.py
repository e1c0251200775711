"""Errors and warnings that tell a newcomer or an operator what to do next."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from durable_streams.models import Status
from durable_streams.models import Workflow as WorkflowRun
from tests import workflows

ROOT = Path(__file__).resolve().parent.parent


def _unmigrated(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` with the test settings against a new, empty SQLite database."""
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["DS_TEST_SQLITE_DIR"] = str(tmp_path)
    env["DS_TEST_DB_NAME"] = str(tmp_path / "empty.sqlite3")
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_runworkers_before_migrate_says_to_migrate_and_exits(tmp_path: Path) -> None:
    done = _unmigrated(tmp_path, "-m", "django", "runworkers", "--burst")
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert output.count("Run 'python manage.py migrate'.") == 1, output
    assert "unapplied migration(s) on database 'default'" in output
    assert "0001_initial" in output


def test_start_before_migrate_raises_schema_missing(tmp_path: Path) -> None:
    script = (
        "import django; django.setup()\n"
        "from durable_streams import SchemaMissing, start_workflow\n"
        "from tests import workflows\n"
        "try:\n"
        "    start_workflow(workflows.echo, 1)\n"
        "except SchemaMissing as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = _unmigrated(tmp_path, "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: durable_streams has"), done.stdout
    assert "Run 'python manage.py migrate'." in done.stdout


@pytest.mark.django_db(transaction=True)
def test_require_schema_passes_on_a_migrated_database() -> None:
    from durable_streams.schema import require_schema, unapplied_migrations

    assert unapplied_migrations("default") == []
    require_schema("default")


def test_worker_lists_its_workflows_at_debug(
    run_burst: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="durable_streams"):
        run_burst()
    listing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Registered")]
    assert len(listing) == 1
    assert f"{workflows.echo.name} (queue 'default')" in listing[0]


def test_worker_warns_about_a_queue_no_workflow_uses(
    run_burst: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="durable_streams"):
        run_burst(queues=["nosuch"])
    warnings = [r.getMessage() for r in caplog.records if "queue 'nosuch'" in r.getMessage()]
    assert len(warnings) == 1
    assert "No registered workflow uses queue 'nosuch' by default" in warnings[0]


def test_worker_warns_once_about_runs_of_an_unknown_workflow(
    run_burst: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        WorkflowRun.objects.create(
            name="myapp.defined_elsewhere", queue="default", inputs="{}", max_attempts=3
        )
    with caplog.at_level(logging.WARNING, logger="durable_streams"):
        worker = run_burst()
        # A second pass of the same worker within the quiet period adds no warning.
        worker._next_unknown_check = 0.0
        worker._warn_unknown([workflows.echo.name])
    warnings = [r.getMessage() for r in caplog.records if "defined_elsewhere" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "wait in queue 'default', but no running worker has it registered" in warnings[0]
    # They are left waiting for a worker that knows them.
    assert (
        WorkflowRun.objects.filter(name="myapp.defined_elsewhere", status=Status.ENQUEUED).count()
        == 3
    )


def test_a_failed_run_logs_the_error_type_and_message(
    run_burst: Any, caplog: pytest.LogCaptureFixture
) -> None:
    handle = workflows.fails.start("the disk is full")
    with caplog.at_level(logging.INFO, logger="durable_streams"):
        run_burst()
    ends = [r for r in caplog.records if "ERROR in" in r.getMessage()]
    assert len(ends) == 1
    assert ends[0].levelno == logging.ERROR
    assert handle.workflow_id in ends[0].getMessage()
    assert ends[0].getMessage().endswith("the disk is full")


def test_a_locked_sqlite_database_is_explained_without_a_traceback(
    worker_thread: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    db_vendor: str,
) -> None:
    if db_vendor != "sqlite":
        pytest.skip("SQLite's write lock")
    from django.db import OperationalError

    from durable_streams.models import WorkflowQuerySet
    from tests.waiting import wait_until

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("database is locked")

    monkeypatch.setattr(WorkflowQuerySet, "claim", locked)
    with caplog.at_level(logging.WARNING, logger="durable_streams"):
        worker_thread()
        record = wait_until(
            lambda: next((r for r in caplog.records if "stayed locked" in r.getMessage()), None),
            timeout=10,
            what="the locked-database warning",
        )
    message = record.getMessage()
    assert record.exc_info is None
    assert message.startswith("Could not claim work: The SQLite database ")
    assert "its busy timeout (20 s)" in message
    assert "a sqlite3 shell" in message
