"""The admin in headless Chromium: a running workflow's stream grows on its page.

A daphne process serves the test database (HTTP and the stream sockets), a worker
thread in this process runs the workflows, and Playwright drives the browser.
Screenshots of the changelist and of the workflow page go to /tmp.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.urls import reverse

from durable_streams.admin import display as ds_display
from durable_streams.bus import publish_changes
from durable_streams.models import Status, StreamEntry, Workflow
from tests import workflows
from tests.chromium import CHROMIUM, launch_chromium
from tests.processes import ROOT
from tests.waiting import wait_until

pytestmark = pytest.mark.browser

CLIENT_JS = ROOT / "durable_streams" / "static" / "durable_streams" / "durable-streams.js"
SCREENSHOTS = Path("/tmp")

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (extra 'browser')."
)
if not CHROMIUM.exists():
    pytest.skip(
        f"No Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium).",
        allow_module_level=True,
    )
if not CLIENT_JS.exists():
    pytest.skip(f"The live client {CLIENT_JS.name} is not there.", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def server(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    """Daphne serving ``tests.asgi`` on the database of this test run."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        DS_TEST_DB_NAME=str(connection.settings_dict["NAME"]),
    )
    log = tmp_path / "daphne.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "tests.asgi:application",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"daphne exited:\n{log.read_text(errors='replace')}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, timeout=30, interval=0.05, what="daphne to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # Playwright's sync API keeps an event loop in this thread; the ORM calls the test
    # makes meanwhile are still plain blocking calls.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    try:
        with launch_chromium() as chromium:
            yield chromium
    finally:
        # Queries made while Playwright runs may have opened connections of their
        # own; an open one would keep PostgreSQL from dropping the test database.
        connections.close_all()


def log_in(browser: Any, server: str, errors: list[str]) -> Any:
    User.objects.create_superuser("ops", "ops@example.com", "correct horse battery")
    page = browser.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page.set_default_timeout(15_000)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server}{reverse('admin:login')}")
    page.fill("#id_username", "ops")
    page.fill("#id_password", "correct horse battery")
    page.click("input[type=submit]")
    page.wait_for_url(f"{server}/admin/")
    return page


def offsets_on(page: Any) -> list[int]:
    return page.eval_on_selector_all(
        "[data-ds-stream] [data-ds-entries] tr td.ds-num",
        "cells => cells.map(cell => Number(cell.textContent))",
    )


def test_a_running_workflows_stream_grows_on_its_page(
    server: str, browser: Any, live_worker: Any
) -> None:
    errors: list[str] = []
    page = log_in(browser, server, errors)
    # Some history, so that the changelist shows each state.
    finished = [workflows.echo.start(i, word=w) for i, w in enumerate(["alpha", "beta"])]
    failed = workflows.fails.start("the payment provider timed out")
    for handle in finished:
        handle.result(timeout=10)
    wait_until(lambda: failed.status == Status.ERROR, timeout=10, what="the failure")
    count = 30
    running = workflows.steady.using(owner=User.objects.get()).start(count, 0.12, key="tokens")
    wait_until(
        lambda: StreamEntry.objects.filter(stream__workflow_id=running.workflow_id).count() >= 3,
        timeout=10,
        what="the first values",
    )

    page.goto(
        f"{server}{reverse('admin:durable_streams_workflow_change', args=[running.workflow_id])}"
    )
    panel = page.locator("[data-ds-stream][data-key='tokens']")
    rendered = int(panel.get_attribute("data-next-offset"))
    assert rendered < count, "the workflow ended before the page opened; slow it down"
    # Values written after the page rendered arrive over the socket.
    page.wait_for_function(
        "n => document.querySelector('[data-ds-stream] tr[data-offset]')"
        " && Number(document.querySelector('[data-ds-length]').textContent) >= n",
        arg=rendered + 3,
    )
    assert panel.locator("[data-ds-live]").is_visible()
    page.screenshot(path=str(SCREENSHOTS / "ds-admin-workflow.png"), full_page=True)

    # The close arrives too, and every value is on the page once, in order.
    page.wait_for_function(
        "() => document.querySelector('[data-ds-stream]').dataset.open === 'false'", timeout=20_000
    )
    assert panel.locator("[data-ds-state]").inner_text() == "Closed"
    assert panel.locator("[data-ds-length]").inner_text() == str(count)
    shown = offsets_on(page)
    assert shown == list(range(shown[0], count)), shown
    assert shown[0] == max(rendered - ds_display.PAGE_TAIL, 0)
    values = page.eval_on_selector_all(
        "[data-ds-entries] tr[data-offset] td.ds-value code",
        "cells => cells.map(c => c.textContent)",
    )
    assert values == [json.dumps(i) for i in range(rendered, count)]
    assert running.result(timeout=10) == count

    page.goto(f"{server}{reverse('admin:durable_streams_workflow_changelist')}")
    assert page.locator("#result_list tbody tr").count() == 4
    assert page.locator(".ds-badge-error").count() == 1
    page.screenshot(path=str(SCREENSHOTS / "ds-admin-changelist.png"), full_page=True)
    page.goto(
        f"{server}{reverse('admin:durable_streams_workflow_change', args=[failed.workflow_id])}"
    )
    assert "the payment provider timed out" in page.locator(".ds-card-error").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "ds-admin-failed.png"), full_page=True)
    assert errors == []


def test_an_interrupted_stream_is_shown_so_and_follows_the_resume(
    server: str, browser: Any, live_worker: Any
) -> None:
    from tests.models import Effect
    from tests.workflows_interrupted import interruptible

    errors: list[str] = []
    page = log_in(browser, server, errors)
    run = interruptible.start("out", ["a", "b"], ["c", "d"], "admin-gate", False)
    wait_until(
        lambda: StreamEntry.objects.filter(stream__workflow_id=run.workflow_id).count() >= 3,
        timeout=10,
        what="the first values",
    )
    page.goto(f"{server}{reverse('admin:durable_streams_workflow_change', args=[run.workflow_id])}")
    panel = page.locator("[data-ds-stream][data-key='out']")
    state = panel.locator("[data-ds-state]")
    page.wait_for_function("() => document.querySelector('[data-ds-live]:not([hidden])')")
    assert run.cancel()
    page.wait_for_function(
        "() => document.querySelector(\"[data-key='out'] [data-ds-state]\")"
        ".textContent === 'Interrupted'"
    )
    assert panel.get_attribute("data-open") == "true"
    # The header stream was closed by close_stream() before the cancel: closed for good.
    assert page.locator("[data-key='header'] [data-ds-state]").inner_text() == "Closed"
    Effect.objects.create(workflow_id="", label="admin-gate")
    publish_changes(Workflow.objects.filter(pk=run.workflow_id).resume()[1], DEFAULT_DB_ALIAS)
    page.wait_for_function(
        "() => document.querySelector(\"[data-key='out']\").dataset.open === 'false'",
        timeout=20_000,
    )
    assert state.inner_text() == "Closed"
    assert offsets_on(page)[-2:] == [2, 3]
    assert panel.locator("[data-ds-length]").inner_text() == "4"
    assert errors == []
