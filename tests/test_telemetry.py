"""OpenTelemetry spans and metrics: what a run reports with TELEMETRY on, and nothing when off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs opentelemetry-sdk (the otel-test extra)")

from asgiref.sync import sync_to_async
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from durable_streams import (
    Status,
    start_workflow,
    step,
    telemetry,
    workflow,
    write_stream,
)
from durable_streams.checks import check_settings
from durable_streams.exceptions import ImproperlyInstalled, WorkflowNotRegistered
from durable_streams.models import Workflow
from durable_streams.runtime import registry
from tests.sockets import (
    READER_FIXTURES,
    open_socket,
    path,
)
from tests.test_sse import get, url
from tests.waiting import wait_until_async
from tests.workflows_readers import gated

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]

# The API's global providers can be set once per process: once, for the whole module.
SPANS = InMemorySpanExporter()
READER = InMemoryMetricReader()
_tracer_provider = TracerProvider()
_tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_tracer_provider)
metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))

ON = {"TELEMETRY": True}
P = "tests.test_telemetry."  # step names are qualified


@step
def first_step(x: int) -> int:
    return x + 1


@step
def second_step(x: int) -> int:
    write_stream("out", x)
    write_stream("out", x * 10)
    return x * 2


@step(retries=1, backoff=0)
def failing_step(message: str) -> None:
    raise ValueError(message)


@workflow(name="tests.telemetry.three_steps", queue="telemetry")
def three_steps(x: int, fail: bool) -> int:
    y = second_step(first_step(x))
    if fail:
        failing_step("no luck")
    return y


@pytest.fixture
def telemetry_on(settings: Any) -> Iterator[None]:
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, **ON}
    SPANS.clear()
    yield
    SPANS.clear()


def points() -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
    """Every metric point collected now, by metric name and attributes."""
    found: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
    data = READER.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            if scope.scope.name != "durable_streams":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, frozenset((point.attributes or {}).items()))
                    found[key] = point.count if hasattr(point, "count") else point.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, Any]]], Any], name: str, **attributes: Any
) -> Any:
    wanted = frozenset(
        (f"durable_streams.{k.replace('__', '.')}", v) for k, v in attributes.items()
    )
    return found.get((name, wanted), 0)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return sorted(
        (s for s in spans if s.name == name),
        key=lambda s: (s.attributes or {}).get("durable_streams.step.operation", 0),
    )


def test_a_failing_run_reports_its_spans_and_metrics(
    telemetry_on: None, run_burst: Callable[..., Any]
) -> None:
    before = points()
    handle = three_steps.start(3, True)
    run_burst(queues=["telemetry"])
    assert Workflow.objects.get(pk=handle.workflow_id).status == Status.ERROR
    spans = SPANS.get_finished_spans()
    [run] = by_name(spans, telemetry.WORKFLOW_SPAN)
    assert dict(run.attributes or {}) == {
        "durable_streams.workflow.id": handle.workflow_id,
        "durable_streams.workflow.name": "tests.telemetry.three_steps",
        "durable_streams.workflow.queue": "telemetry",
        "durable_streams.workflow.attempt": 1,
        "durable_streams.workflow.status": "ERROR",
    }
    assert run.status.status_code == StatusCode.ERROR
    assert (
        run.status.description
        == "StepFailed: Step 'tests.test_telemetry.failing_step' failed: ValueError: no luck"
    )
    [event] = [e for e in run.events if e.name == "exception"]
    assert (event.attributes or {})["exception.type"] == "StepFailed"
    assert "ValueError: no luck" in str((event.attributes or {})["exception.stacktrace"])
    assert run.parent is None

    steps = by_name(spans, telemetry.STEP_SPAN)
    assert [
        (
            (s.attributes or {})["durable_streams.step.name"],
            (s.attributes or {})["durable_streams.step.attempt"],
            (s.attributes or {})["durable_streams.step.outcome"],
        )
        for s in steps
    ] == [
        (P + "first_step", 1, "SUCCESS"),
        (P + "second_step", 1, "SUCCESS"),
        (P + "failing_step", 1, "ERROR"),
        (P + "failing_step", 2, "ERROR"),
    ]
    operations = [(s.attributes or {})["durable_streams.step.operation"] for s in steps]
    assert operations[0] < operations[1] < operations[2] == operations[3]
    for child in steps:
        assert child.parent is not None
        assert child.parent.span_id == run.context.span_id
        assert child.context.trace_id == run.context.trace_id
    assert steps[0].status.status_code == StatusCode.UNSET
    assert steps[2].status.status_code == StatusCode.ERROR
    assert [e.name for e in steps[2].events] == ["exception"]

    after = points()
    name = "tests.telemetry.three_steps"
    started = "durable_streams.workflows.started"
    finished = "durable_streams.workflows.finished"
    duration = "durable_streams.step.duration"
    written = "durable_streams.stream.values_written"
    assert (
        value(after, started, workflow__name=name, workflow__queue="telemetry")
        - value(before, started, workflow__name=name, workflow__queue="telemetry")
        == 1
    )
    assert (
        value(after, finished, workflow__name=name, workflow__status="ERROR")
        - value(before, finished, workflow__name=name, workflow__status="ERROR")
        == 1
    )
    for step_name, outcome, count in [
        (P + "first_step", "SUCCESS", 1),
        (P + "second_step", "SUCCESS", 1),
        (P + "failing_step", "ERROR", 2),
    ]:
        labels = {"step__name": step_name, "step__outcome": outcome}
        assert value(after, duration, **labels) - value(before, duration, **labels) == count
    assert value(after, written) - value(before, written) == 2


def test_a_successful_run_and_replayed_steps(
    telemetry_on: None, run_burst: Callable[..., Any]
) -> None:
    before = points()
    handle = three_steps.start(1, False)
    run_burst(queues=["telemetry"])
    assert handle.result() == 4
    [run] = by_name(SPANS.get_finished_spans(), telemetry.WORKFLOW_SPAN)
    assert (run.attributes or {})["durable_streams.workflow.status"] == "SUCCESS"
    assert run.status.status_code == StatusCode.UNSET
    after = points()
    finished = "durable_streams.workflows.finished"
    labels = {"workflow__name": "tests.telemetry.three_steps", "workflow__status": "SUCCESS"}
    assert value(after, finished, **labels) - value(before, finished, **labels) == 1

    # A second attempt replays the recorded steps from their checkpoints: no span for them.
    Workflow.objects.filter(pk=handle.workflow_id).update(status=Status.ENQUEUED, output=None)
    SPANS.clear()
    run_burst(queues=["telemetry"])
    spans = SPANS.get_finished_spans()
    [again] = by_name(spans, telemetry.WORKFLOW_SPAN)
    assert (again.attributes or {})["durable_streams.workflow.attempt"] == 2
    assert by_name(spans, telemetry.STEP_SPAN) == []


def test_a_run_no_worker_function_knows_ends_in_error(
    telemetry_on: None, run_burst: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = three_steps.start(1, False)
    real_get = registry.get

    def get(name: str) -> Any:
        if name == three_steps.name and sys._getframe(1).f_code.co_name == "_run_workflow":
            raise WorkflowNotRegistered(f"no {name}")
        return real_get(name)

    # The registry lost it between the claim and the run.
    monkeypatch.setattr(registry, "get", get)
    run_burst(queues=["telemetry"])
    assert Workflow.objects.get(pk=handle.workflow_id).status == Status.ERROR
    [run] = by_name(SPANS.get_finished_spans(), telemetry.WORKFLOW_SPAN)
    assert (run.attributes or {})["durable_streams.workflow.status"] == "ERROR"
    assert run.status.description == f"WorkflowNotRegistered: no {three_steps.name}"


def test_off_by_default_nothing_is_reported(run_burst: Callable[..., Any]) -> None:
    SPANS.clear()
    before = points()
    handle = three_steps.start(2, True)
    run_burst(queues=["telemetry"])
    assert Workflow.objects.get(pk=handle.workflow_id).status == Status.ERROR
    assert SPANS.get_finished_spans() == ()
    assert points() == before


def test_off_it_never_imports_opentelemetry(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        import django
        django.setup()
        from durable_streams import telemetry
        telemetry.workflow_started("w", "default")
        telemetry.values_written(3)
        telemetry.reader_connected("sse")
        telemetry.reader_disconnected("sse")
        telemetry.workflow_ended("SUCCESS")
        fn = len
        assert telemetry.step_attempt(fn, "s", 1, 1) is fn
        with telemetry.workflow_run(None, None):  # type: ignore[arg-type]
            pass
        telemetry.observe_queue_depth(["default"])
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        """
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


async def test_websocket_readers_are_counted(telemetry_on: None) -> None:
    handle = await sync_to_async(start_workflow)(gated, "out", [], [], "never", public=True)
    # An enqueued run's stream can be read: the socket waits for its first value.
    metric = "durable_streams.readers.connected"
    before = value(await sync_to_async(points)(), metric, transport="websocket")
    communicator = await open_socket(path(handle.workflow_id, "out"))
    assert value(await sync_to_async(points)(), metric, transport="websocket") == before + 1
    await communicator.disconnect()
    assert value(await sync_to_async(points)(), metric, transport="websocket") == before


async def test_sse_readers_are_counted(telemetry_on: None) -> None:
    # An enqueued run: the response stays open, waiting for the stream's first value.
    handle = await sync_to_async(start_workflow)(gated, "out", [], [], "never", public=True)
    metric = "durable_streams.readers.connected"

    def readers() -> int:
        return int(value(points(), metric, transport="sse"))

    before = await sync_to_async(readers)()
    response = await get(url(handle.workflow_id, "out"))
    await wait_until_async(lambda: readers() == before + 1, what="the reader counted")
    await response.communicator.send_input({"type": "http.disconnect"})
    await wait_until_async(lambda: readers() == before, what="the reader uncounted")


def test_queue_depth_is_one_query_per_collection(telemetry_on: None) -> None:
    for _ in range(2):
        start_workflow(three_steps, 0, False)
    start_workflow(three_steps, 0, False, queue="elsewhere")
    telemetry.observe_queue_depth(["telemetry", "empty"])
    with CaptureQueriesContext(connection) as queries:
        found = points()
    assert value(found, "durable_streams.queue.depth", queue="telemetry") == 2
    assert ("durable_streams.queue.depth", frozenset({("durable_streams.queue", "empty")})) in found
    assert value(found, "durable_streams.queue.depth", queue="empty") == 0
    depths = {labels for (name, labels) in found if name == "durable_streams.queue.depth"}
    assert depths == {
        frozenset({("durable_streams.queue", "telemetry")}),
        frozenset({("durable_streams.queue", "empty")}),
    }
    assert len(queries) == 1


def test_on_without_the_api_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("opentelemetry", "opentelemetry.trace", "opentelemetry.metrics"):
        monkeypatch.setitem(sys.modules, module, None)
    with override_settings(DURABLE_STREAMS=ON):
        [error] = [m for m in check_settings() if m.id == "durable_streams.E008"]
        assert error.hint == 'pip install "durable-streams[otel]"'
        with pytest.raises(ImproperlyInstalled, match=r'pip install "durable-streams\[otel\]"'):
            telemetry._instruments.__wrapped__()
    assert [m for m in check_settings() if m.id == "durable_streams.E008"] == []


def test_the_setting_is_a_bool() -> None:
    with override_settings(DURABLE_STREAMS={"TELEMETRY": "yes"}):
        [error] = check_settings()
    assert error.id == "durable_streams.E001"
    assert "TELEMETRY" in error.msg and "True or False" in error.msg
