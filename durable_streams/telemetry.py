"""OpenTelemetry spans and metrics, off unless ``DURABLE_STREAMS["TELEMETRY"]`` is True.

Everything durable_streams reports goes through the few functions here. While telemetry is
off each of them is a cheap no-op that never imports opentelemetry. While it is on, spans
and measurements go to the tracer and meter providers the project installed with the
OpenTelemetry API (``trace.set_tracer_provider``, ``metrics.set_meter_provider``):
durable_streams never configures an SDK or an exporter itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import DatabaseError, connections
from django.db.models import Count

from . import encoding
from .conf import get_config
from .db import alias
from .exceptions import ImproperlyInstalled

if TYPE_CHECKING:
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        Observation,
        UpDownCounter,
    )
    from opentelemetry.trace import Span, Tracer

    from .models import Claim

logger = logging.getLogger(__name__)

SCOPE = "durable_streams"
INSTALL_HINT = 'pip install "durable-streams[otel]"'

WORKFLOW_SPAN = "durable_streams.workflow"
STEP_SPAN = "durable_streams.step"
# The status of a run attempt that ended without recording an end: handed back to the
# queue (shutdown, database fault), or cancelled or reclaimed meanwhile.
INTERRUPTED = "INTERRUPTED"

_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()


class _Instrument(NamedTuple):
    name: str
    unit: str
    description: str

    def create(self, factory: Callable[..., Any]) -> Any:
        """The instrument, made by one of the meter's ``create_*`` methods."""
        return factory(self.name, unit=self.unit, description=self.description)


_WORKFLOWS_STARTED = _Instrument("durable_streams.workflows.started", "{workflow}", "Runs started.")
_WORKFLOWS_FINISHED = _Instrument(
    "durable_streams.workflows.finished", "{workflow}", "Runs whose end a worker recorded."
)
_STEP_DURATION = _Instrument("durable_streams.step.duration", "s", "Step attempts' durations.")
_VALUES_WRITTEN = _Instrument(
    "durable_streams.stream.values_written", "{value}", "Stream values stored."
)
_READERS = _Instrument(
    "durable_streams.readers.connected", "{reader}", "WebSocket and SSE readers connected."
)


@dataclass
class _Instruments:
    tracer: Tracer
    started: Counter
    finished: Counter
    step_duration: Histogram
    values_written: Counter
    readers: UpDownCounter


def available() -> bool:
    """Whether the OpenTelemetry API can be imported."""
    try:
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _instruments() -> _Instruments:
    try:
        from opentelemetry import metrics, trace
    except ImportError:
        raise ImproperlyInstalled("opentelemetry-api", "otel") from None
    try:
        version = importlib.metadata.version("durable-streams")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        version = "unknown"

    # Proxies until the project sets its providers; they follow them from then on.
    meter = metrics.get_meter(SCOPE, version)
    return _Instruments(
        tracer=trace.get_tracer(SCOPE, version),
        started=_WORKFLOWS_STARTED.create(meter.create_counter),
        finished=_WORKFLOWS_FINISHED.create(meter.create_counter),
        step_duration=_STEP_DURATION.create(meter.create_histogram),
        values_written=_VALUES_WRITTEN.create(meter.create_counter),
        readers=_READERS.create(meter.create_up_down_counter),
    )


def _active() -> _Instruments | None:
    return _instruments() if get_config().TELEMETRY else None


class _Run:
    """The span of the run attempt in progress in this context."""

    def __init__(self, ins: _Instruments, span: Span, name: str) -> None:
        self.ins, self.span, self.name = ins, span, name
        self.status: str | None = None

    def end(self, status: str, error: str | None) -> None:
        # opentelemetry is optional (the otel extra): imported only while telemetry is on.
        from opentelemetry.trace import StatusCode

        self.status = status
        self.span.set_attribute("durable_streams.workflow.status", status)
        if status == "ERROR":
            record = encoding.loads(error) if error else {}
            kind, message = record.get("type", "Exception"), record.get("message", "")
            # The exception event's semantic-convention attributes: the exception object
            # itself is gone by now, its record is what the run stored.
            self.span.add_event(
                "exception",
                {
                    "exception.type": kind,
                    "exception.message": message,
                    "exception.stacktrace": record.get("traceback", ""),
                },
            )
            self.span.set_status(StatusCode.ERROR, f"{kind}: {message}")
        self.ins.finished.add(
            1,
            {"durable_streams.workflow.name": self.name, "durable_streams.workflow.status": status},
        )


_run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "durable_streams_telemetry_run", default=None
)


def workflow_run(claim: Claim, queue: str | None) -> contextlib.AbstractContextManager[None]:
    """A ``durable_streams.workflow`` span around one run attempt of ``claim`` on a worker."""
    ins = _active()
    if ins is None:
        return _NULL
    return _workflow_run(ins, claim, queue)


@contextlib.contextmanager
def _workflow_run(ins: _Instruments, claim: Claim, queue: str | None) -> Iterator[None]:
    attributes: dict[str, str | int] = {
        "durable_streams.workflow.id": claim.workflow_id,
        "durable_streams.workflow.name": claim.name,
        "durable_streams.workflow.attempt": claim.attempts,
    }
    if queue is not None:
        attributes["durable_streams.workflow.queue"] = queue
    with ins.tracer.start_as_current_span(WORKFLOW_SPAN, attributes=attributes) as span:
        run = _Run(ins, span, claim.name)
        token = _run.set(run)
        try:
            yield
        finally:
            _run.reset(token)
            if run.status is None:
                span.set_attribute("durable_streams.workflow.status", INTERRUPTED)


def workflow_ended(status: str, error: str | None = None) -> None:
    """The worker recorded the end of the run in progress: ``status``, ``error`` its record."""
    run = _run.get()
    if run is not None:
        run.end(str(status), error)


def workflow_started(name: str, queue: str) -> None:
    """A run of workflow ``name`` was enqueued on ``queue``."""
    ins = _active()
    if ins is not None:
        ins.started.add(
            1, {"durable_streams.workflow.name": name, "durable_streams.workflow.queue": queue}
        )


def step_attempt(
    fn: Callable[..., Any], name: str, operation: int, attempt: int
) -> Callable[..., Any]:
    """``fn``, or while a run is traced, ``fn`` timed in a ``durable_streams.step`` span."""
    run = _run.get()
    if run is None:
        return fn
    ins = run.ins

    def attempted(*args: Any, **kwargs: Any) -> Any:
        # opentelemetry is optional (the otel extra): imported only while telemetry is on.
        from opentelemetry.trace import StatusCode

        attributes: dict[str, str | int] = {
            "durable_streams.step.name": name,
            "durable_streams.step.operation": operation,
            "durable_streams.step.attempt": attempt,
        }
        with ins.tracer.start_as_current_span(
            STEP_SPAN, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            outcome = INTERRUPTED
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                outcome = "SUCCESS"
                return result
            except Exception as exc:
                outcome = "ERROR"
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, f"{type(exc).__qualname__}: {exc}")
                raise
            finally:
                span.set_attribute("durable_streams.step.outcome", outcome)
                ins.step_duration.record(
                    time.perf_counter() - started,
                    {"durable_streams.step.name": name, "durable_streams.step.outcome": outcome},
                )

    return attempted


def values_written(count: int) -> None:
    """``count`` stream values were stored (their transaction committed)."""
    ins = _active()
    if ins is not None:
        ins.values_written.add(count)


def reader_connected(transport: str) -> None:
    """A WebSocket (``"websocket"``) or SSE (``"sse"``) reader started reading."""
    ins = _active()
    if ins is not None:
        ins.readers.add(1, {"durable_streams.transport": transport})


def reader_disconnected(transport: str) -> None:
    ins = _active()
    if ins is not None:
        ins.readers.add(-1, {"durable_streams.transport": transport})


_queues: set[str] = set()
_queues_lock = threading.Lock()


def observe_queue_depth(queues: Iterable[str]) -> None:
    """Report the enqueued runs of ``queues`` as the ``durable_streams.queue.depth`` gauge.

    One query per collection, made by the metric reader when it collects. Called by
    ``runworkers``; a process that calls it again adds its queues to the same gauge.
    """
    if _active() is None:
        return
    with _queues_lock:
        first = not _queues
        _queues.update(queues)
    if first:
        # opentelemetry is optional (the otel extra): imported only while telemetry is on.
        from opentelemetry import metrics

        metrics.get_meter(SCOPE).create_observable_gauge(
            "durable_streams.queue.depth",
            callbacks=[_queue_depth],
            unit="{workflow}",
            description="Runs enqueued, per queue.",
        )


def _queue_depth(options: CallbackOptions) -> Iterable[Observation]:
    # opentelemetry is optional (the otel extra), and the models need the app registry,
    # which is not ready yet when the system checks import this module.
    from opentelemetry.metrics import Observation

    from .models import Status, Workflow

    with _queues_lock:
        queues = sorted(_queues)
    using = alias()
    try:
        counts = dict(
            Workflow.objects.using(using)
            .filter(status=Status.ENQUEUED, queue__in=queues)
            .order_by()
            .values("queue")
            .annotate(count=Count("id"))
            .values_list("queue", "count")
        )
    except DatabaseError as exc:
        logger.warning("Could not count the enqueued runs for telemetry (%s).", exc)
        counts = None
    finally:
        # The metric reader's thread keeps no connection open between collections.
        connection = connections[using]
        if not connection.in_atomic_block:
            connection.close()
    if counts is None:
        return []
    return [Observation(counts.get(queue, 0), {"durable_streams.queue": queue}) for queue in queues]
