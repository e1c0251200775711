"""What runs inside a workflow: operation numbers, replay, steps and stream writes.

Every call the workflow body makes that has an effect (a step, a stream write or
close, a child workflow start) takes the next *operation number*. Because the body
is deterministic, a replay meets the same operations in the same order, finds
them recorded and skips them.
"""

from __future__ import annotations

import random
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, NoReturn

from django.db import Error, connections, transaction
from django.utils import timezone

from .. import encoding, telemetry
from ..backends import backend_for
from ..conf import get_config
from ..exceptions import (
    Interrupted,
    LeaseLost,
    NonDeterministicWorkflow,
    NotInWorkflow,
    StepFailed,
    StreamClosed,
)
from ..models import Step, Workflow
from . import writer

WRITE = "write_stream"
CLOSE = "close_stream"
STEP = "step"
# The operations of the wait functions (runtime.waiting), recorded as checkpoints
# under these step names; in the history each is a kind of its own.
WAIT_KINDS = {
    "durable_streams.sleep": "sleep",
    "durable_streams.send": "send",
    "durable_streams.recv": "recv",
    "durable_streams.set_event": "set_event",
}


class StopEvent(threading.Event):
    """The run's stop flag; setting it also wakes a wait function waiting on the bus."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: set[Callable[[], None]] = set()
        self._watch_lock = threading.Lock()

    def set(self) -> None:
        super().set()
        with self._watch_lock:
            watchers = list(self._watchers)
        for ring in watchers:
            ring()

    @contextmanager
    def watched_by(self, ring: Callable[[], None]) -> Iterator[None]:
        with self._watch_lock:
            self._watchers.add(ring)
        try:
            yield
        finally:
            with self._watch_lock:
                self._watchers.discard(ring)


@dataclass
class _StreamState:
    id: int | None  # None until the writer thread has stored the stream's row
    length: int  # including writes still queued
    closed: bool  # including a queued close


@dataclass(eq=False)
class Execution:
    """The state of one workflow run in one worker thread."""

    workflow_id: str
    worker_id: str
    using: str
    # operation number -> (kind, name): what a previous run recorded
    history: dict[int, tuple[str, str]] = field(default_factory=dict)
    streams: dict[str, _StreamState] = field(default_factory=dict)
    next_operation: int = 0
    step_name: str | None = None
    # Set by the worker (shutdown, lost lease, cancel); checked at every step boundary.
    stop: StopEvent = field(default_factory=StopEvent)
    stop_reason: str = ""
    # A non-determinism error, kept even if the workflow body catches it.
    fatal: BaseException | None = None
    # Group commit bookkeeping, guarded by the writer's lock.
    submitted: int = 0
    stored: int = 0
    pending_bytes: int = 0
    write_error: BaseException | None = None
    # True while an atomic step runs: its stream writes join its transaction.
    in_transaction: bool = False
    # A statement of the library's own (a checkpoint, a history read) that failed.
    fault: BaseException | None = None
    # The wait an earlier run was suspended in: (operation, deadline as a Unix time or
    # None). A recv reaching that operation keeps the deadline it had.
    suspended_wait: tuple[int, float | None] | None = None

    def stream_id(self, key: str) -> int | None:
        state = self.streams.get(key)
        return None if state is None else state.id

    def set_stream_id(self, key: str, stream_id: int) -> None:
        self.streams[key].id = stream_id

    def flush(self) -> None:
        """Wait until every queued stream write is stored."""
        if self.submitted:
            writer.committer(self.using).flush(self)

    @classmethod
    def load(cls, workflow_id: str, worker_id: str, using: str) -> Execution:
        """Read what earlier runs of this workflow recorded (and the wait it was last
        suspended in)."""
        execution = cls(workflow_id, worker_id, using)
        operation, wake_at = Workflow.objects.using(using).wait_of(workflow_id)
        if operation is not None:
            execution.suspended_wait = (
                operation,
                None if wake_at is None else wake_at.timestamp(),
            )
        for row in Workflow.objects.using(using).history(workflow_id):
            if row.kind == STEP:
                assert row.operation is not None  # a checkpoint's column is NOT NULL
                wait = WAIT_KINDS.get(row.name)
                execution.history[row.operation] = (STEP, row.name) if wait is None else (wait, "")
            elif row.kind == WRITE:
                assert row.operation is not None  # the query keeps only numbered writes
                execution.history[row.operation] = (WRITE, row.name)
            else:
                execution.streams[row.name] = _StreamState(
                    row.stream_id, row.length, bool(row.closed)
                )
                if row.operation is not None:
                    execution.history[row.operation] = (CLOSE, row.name)
        return execution

    def take_operation(self, kind: str, name: str) -> tuple[int, bool]:
        """Return the next operation number and whether a previous run recorded it."""
        operation = self.next_operation
        self.next_operation += 1
        recorded = self.history.get(operation)
        if recorded is None:
            return operation, False
        if recorded != (kind, name):
            error = NonDeterministicWorkflow(
                f"Workflow {self.workflow_id!r} reached {_describe(kind, name)} at operation "
                f"{operation}, but an earlier run recorded {_describe(*recorded)} there. "
                "Workflow code must make the same calls in the same order on every run."
            )
            self.fatal = error
            raise error
        return operation, True

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted(self.stop_reason or "stopped")

    def fence(self) -> None:
        """Prove inside the current transaction that this worker still holds the workflow.

        The UPDATE also renews the lease, and takes the write lock where the database
        locks the whole file.
        """
        held = (
            Workflow.objects.using(self.using)
            .held_by(self.worker_id)
            .filter(pk=self.workflow_id)
            .update(lease_expires_at=self.lease_until())
        )
        if not held:
            self.lease_lost()

    def lease_until(self) -> datetime:
        return timezone.now() + timedelta(seconds=get_config().LEASE_SECONDS)

    def lease_lost_error(self) -> LeaseLost:
        return LeaseLost(
            f"Worker {self.worker_id!r} no longer holds workflow {self.workflow_id!r}."
        )

    def lease_lost(self) -> NoReturn:
        self.stop_reason = "the workflow was cancelled or reclaimed by another worker"
        self.stop.set()
        raise self.lease_lost_error()


def database_failed(execution: Execution, what: str, exc: BaseException) -> Interrupted:
    """Stop the run because one of the library's own statements failed.

    The workflow's code did nothing wrong: the run stops like one whose stream write
    failed, and is replayed from its checkpoints (the attempt counts).
    """
    if execution.fault is None:
        execution.fault = exc
    execution.stop_reason = f"the database failed while {what}: {type(exc).__name__}: {exc}"
    execution.stop.set()
    return Interrupted(execution.stop_reason)


@contextmanager
def library_statements(execution: Execution, what: str) -> Iterator[None]:
    """Turn a database error of the statements in the block into a stop of the run."""
    try:
        yield
    except Error as exc:
        raise database_failed(execution, what, exc) from exc


@contextmanager
def on_behalf_of_body(what: str) -> Iterator[None]:
    """``library_statements`` for the current workflow body, if the caller is one.

    Called from a step, or outside a workflow, a database error stays what it is: in a
    step it is the step's failure, and its retries apply.
    """
    execution = _current.get()
    if execution is None or execution.step_name is not None:
        yield
        return
    with library_statements(execution, what):
        yield


def _heal_connection(using: str) -> None:
    """Drop a connection that a failed step broke, so that its retry gets a new one."""
    connection = connections[using]
    if (
        connection.connection is not None
        and connection.errors_occurred
        and not connection.in_atomic_block
        and not connection.is_usable()
    ):
        connection.close()


def _describe(kind: str, name: str) -> str:
    if kind == STEP:
        return f"step {name!r}"
    if kind in WAIT_KINDS.values():
        return f"{kind}()"
    return f"{kind}({name!r})"


_current: ContextVar[Execution | None] = ContextVar("durable_streams_execution", default=None)


def current_execution() -> Execution | None:
    return _current.get()


@contextmanager
def executing(execution: Execution) -> Iterator[Execution]:
    token = _current.set(execution)
    try:
        yield execution
    finally:
        _current.reset(token)


def _require(function: str) -> Execution:
    execution = _current.get()
    if execution is None:
        raise NotInWorkflow(
            f"{function}() can only be called from a workflow, or from a step running in one."
        )
    return execution


def error_record(exc: BaseException) -> dict[str, str]:
    return {
        "type": type(exc).__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


# Steps


def run_step(
    fn: Callable[..., Any],
    name: str,
    retries: int,
    backoff: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    atomic: bool = False,
) -> Any:
    execution = _current.get()
    if execution is None or execution.step_name is not None:
        # Outside a workflow, and inside another step, a step is a plain call.
        return fn(*args, **kwargs)
    execution.check_stop()
    operation, replaying = execution.take_operation(STEP, name)
    if replaying:
        return _replay_step(execution, operation, name)
    # Values written before the step are stored before it starts.
    execution.flush()
    started = timezone.now()
    attempt = 0
    while True:
        attempt += 1
        execution.step_name = name
        call = telemetry.step_attempt(fn, name, operation, attempt)
        try:
            if atomic:
                # The step's own database writes, its stream writes and its
                # checkpoint commit together, or not at all.
                saved = {key: replace(state) for key, state in execution.streams.items()}
                execution.in_transaction = True
                # Where the database locks rows, the fence comes last, so the workflow's
                # row stays unlocked while the step runs: the heartbeat renews the lease
                # and a cancel does not wait for the step. Where it locks the whole file
                # it comes first: its UPDATE takes the write lock before the step reads,
                # so the step never has to upgrade a read lock (which fails at once
                # rather than waiting).
                fence_last = backend_for(execution.using).fence_after_atomic_step
                # What the step's own code raised, told apart from the errors of the
                # fence, the checkpoint and the commit (the library's statements).
                raised: BaseException | None = None
                try:
                    with transaction.atomic(using=execution.using):
                        if not fence_last:
                            execution.fence()
                        try:
                            result = call(*args, **kwargs)
                            output = encoding.encode(result, f"The result of step {name!r}")
                        except BaseException as exc:
                            raised = exc
                            raise
                        if fence_last:
                            execution.fence()
                        record_checkpoint(
                            execution,
                            operation,
                            name,
                            Step.Outcome.SUCCESS,
                            output,
                            None,
                            attempt,
                            started,
                        )
                except Error as exc:
                    execution.streams = saved
                    if exc is raised:
                        raise
                    raise database_failed(
                        execution, f"storing the checkpoint of atomic step {name!r}", exc
                    ) from exc
                except BaseException:
                    execution.streams = saved
                    raise
                finally:
                    execution.in_transaction = False
                return encoding.loads(output)
            result = call(*args, **kwargs)
        except (LeaseLost, NonDeterministicWorkflow):
            raise
        except Exception as exc:
            if attempt <= retries:
                _heal_connection(execution.using)
                delay = min(backoff * 2 ** (attempt - 1), 3600.0) * random.uniform(0.9, 1.1)
                if execution.stop.wait(delay):
                    raise Interrupted(execution.stop_reason) from exc
                continue
            record = error_record(exc)
            record_checkpoint(
                execution,
                operation,
                name,
                Step.Outcome.ERROR,
                None,
                record,
                attempt,
                started,
            )
            raise StepFailed(name, record["type"], record["message"]) from exc
        finally:
            execution.step_name = None
        output = encoding.encode(result, f"The result of step {name!r}")
        record_checkpoint(
            execution,
            operation,
            name,
            Step.Outcome.SUCCESS,
            output,
            None,
            attempt,
            started,
        )
        # Return what a replay will return, so both runs see the same value.
        return encoding.loads(output)


def _replay_step(execution: Execution, operation: int, name: str) -> Any:
    with library_statements(execution, f"reading the checkpoint of step {name!r}"):
        step = Step.objects.using(execution.using).get(
            workflow_id=execution.workflow_id, operation=operation
        )
    if step.status == Step.Outcome.SUCCESS:
        return None if step.output is None else encoding.loads(step.output)
    record = encoding.loads(step.error or "{}")
    raise StepFailed(name, record.get("type", "Exception"), record.get("message", ""))


def record_checkpoint(
    execution: Execution,
    operation: int,
    name: str,
    outcome: str,
    output: str | None,
    error: dict[str, str] | None,
    attempts: int,
    started: Any,
) -> None:
    step = Step(
        workflow_id=execution.workflow_id,
        operation=operation,
        name=name,
        status=outcome,
        output=output,
        error=None if error is None else encoding.dumps(error),
        attempts=attempts,
        started_at=started,
        finished_at=timezone.now(),
    )
    steps = Step.objects.using(execution.using)
    if execution.in_transaction:
        # An atomic step's transaction holds the fence (see run_step).
        step.save(using=execution.using, force_insert=True)
    elif execution.stored < execution.submitted:
        # Values the step wrote are still queued: the checkpoint joins them in the
        # writer's next batch, which other workflows' writes and checkpoints share.
        committer = writer.committer(execution.using)
        committer.submit(execution, writer.PendingCheckpoint(step))
        committer.flush(execution)
    else:
        execution.flush()  # raises if a value written before could not be stored
        with library_statements(execution, f"storing the checkpoint of step {name!r}"):
            held = steps.checkpoint(step, execution.worker_id, execution.lease_until())
        if not held:
            execution.lease_lost()
    wait = WAIT_KINDS.get(name)
    execution.history[operation] = (STEP, name) if wait is None else (wait, "")


# Streams


def write_stream(key: str, value: Any) -> None:
    """Append ``value`` to the stream ``key`` of the running workflow.

    From the workflow body the write is exactly-once: it is recorded under the
    body's next operation number in the same transaction as the value, and a replay
    skips it. From inside a step the value is visible at once, and a step that is
    retried writes again (at-least-once, like the step itself).
    """
    execution = _require("write_stream")
    encoding.check_key(key)
    text = encoding.encode_stream_value(key, value, get_config().MAX_VALUE_BYTES)
    if execution.step_name is not None:
        _append(execution, key, text, None)
        return
    execution.check_stop()
    operation, replaying = execution.take_operation(WRITE, key)
    if not replaying:
        _append(execution, key, text, operation)


def close_stream(key: str) -> None:
    """Close the stream ``key``; readers end after its last value. Closing twice is harmless."""
    execution = _require("close_stream")
    encoding.check_key(key)
    if execution.step_name is not None:
        _close(execution, key, None)
        return
    execution.check_stop()
    operation, replaying = execution.take_operation(CLOSE, key)
    if not replaying:
        _close(execution, key, operation)


def _append(execution: Execution, key: str, text: str, operation: int | None) -> None:
    state = execution.streams.get(key)
    if state is None:
        state = execution.streams[key] = _StreamState(None, 0, False)
    elif state.closed:
        raise StreamClosed(execution.workflow_id, key)
    _submit(execution, writer.PendingWrite(key, text, operation, state.length))
    state.length += 1
    if operation is not None:
        execution.history[operation] = (WRITE, key)


def _submit(execution: Execution, write: writer.PendingWrite) -> None:
    if execution.in_transaction:
        # The step's transaction fails with it; the run stops and replays.
        with library_statements(execution, f"storing a value of stream {write.key!r}"):
            writer.store_in_transaction(execution, write)
    else:
        writer.committer(execution.using).submit(execution, write)


def _close(execution: Execution, key: str, operation: int | None) -> None:
    state = execution.streams.get(key)
    if state is None:
        state = execution.streams[key] = _StreamState(None, 0, False)
    elif state.closed:
        return
    _submit(execution, writer.PendingWrite(key, None, operation, state.length))
    state.closed = True
    if operation is not None:
        execution.history[operation] = (CLOSE, key)


def child_workflow_id() -> str | None:
    """A deterministic id for a workflow started from a workflow body, so a replay reuses it."""
    execution = _current.get()
    if execution is None or execution.step_name is not None:
        return None
    operation = execution.next_operation
    execution.next_operation += 1
    return f"{execution.workflow_id}-{operation}"
