"""Group commit of stream writes.

Each ``write_stream`` is validated, given its offset and queued in the calling
thread, which then goes on at once. One writer thread per process stores what is
queued, for every running workflow together, in one transaction, so a burst of
writes costs one commit instead of one each. The first write after a quiet spell
is stored at once (no timer), and later writes gather while a commit is in flight.

Nothing is lost by buffering: a value written from the workflow body is recorded
only when its transaction commits, so after a crash the replay writes it again; and
the workflow waits for the queue to drain (``flush``) before every step starts,
before a step's checkpoint, and before it ends.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar

from django.db import transaction
from django.utils import timezone

from .. import telemetry
from ..backends import backend_for
from ..bus import StreamCommitted, publish_streams
from ..conf import get_config
from ..db import ConnectionKeeper, take_write_lock
from ..exceptions import Interrupted, LeaseLost
from ..models import Step, Stream, StreamEntry, Workflow

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_Row = TypeVar("_Row")


class Producer(Protocol):
    """What the writer needs of a workflow's execution (``runtime.Execution`` is one)."""

    workflow_id: str
    worker_id: str
    using: str

    @property
    def stop(self) -> threading.Event: ...

    stop_reason: str
    submitted: int  # writes queued so far (values and checkpoints)
    stored: int  # writes stored, or failed, so far
    pending_bytes: int
    write_error: BaseException | None

    def stream_id(self, key: str) -> int | None: ...

    def set_stream_id(self, key: str, stream_id: int) -> None: ...

    def lease_lost_error(self) -> LeaseLost: ...


logger = logging.getLogger("durable_streams.writer")

# A workflow that writes faster than the database stores waits past these.
MAX_PENDING_VALUES = 5000
MAX_PENDING_BYTES = 16 * 1024 * 1024


@dataclass
class PendingWrite:
    key: str
    text: str | None  # None: close the stream
    operation: int | None
    offset: int  # the entry's offset; for a close, the stream's length

    @property
    def size(self) -> int:
        return len(self.text or "")


@dataclass
class PendingCheckpoint:
    """A step's checkpoint, stored with the values written before it; renews the lease."""

    step: Step

    @property
    def size(self) -> int:
        return len(self.step.output or "") + len(self.step.error or "")


Pending = PendingWrite | PendingCheckpoint


class WriteFailed(Exception):
    """The writer thread could not store queued writes; the run must stop and replay."""


class GroupCommitter:
    def __init__(self, using: str) -> None:
        self.using = using
        self._lock = threading.Lock()
        # Two conditions on one lock: a submit wakes the writer thread only, a stored
        # batch wakes the workflow threads waiting for their writes.
        self._queued = threading.Condition(self._lock)
        self._stored = threading.Condition(self._lock)
        self._queue: dict[Producer, list[Pending]] = {}
        self._release_requested = False
        self._released = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"durable-streams-writer-{using}", daemon=True
        )
        self._thread.start()

    def submit(self, execution: Producer, write: Pending) -> None:
        size = write.size
        with self._lock:
            while execution.write_error is None and (
                execution.submitted - execution.stored >= MAX_PENDING_VALUES
                or (
                    execution.pending_bytes + size > MAX_PENDING_BYTES
                    and execution.submitted > execution.stored
                )
            ):
                self._stored.wait(1.0)
            _raise_write_error(execution)
            self._queue.setdefault(execution, []).append(write)
            execution.submitted += 1
            execution.pending_bytes += size
            self._queued.notify()

    def flush(self, execution: Producer) -> None:
        """Wait until everything ``execution`` queued is stored; raise if it could not be."""
        with self._lock:
            while execution.stored < execution.submitted and execution.write_error is None:
                self._stored.wait(1.0)
            _raise_write_error(execution)

    def release_connection(self, timeout: float = 5.0) -> None:
        """Close the writer thread's connection once its queue is empty."""
        with self._lock:
            self._released.clear()
            self._release_requested = True
            self._queued.notify()
        self._released.wait(timeout)

    def _run(self) -> None:
        keeper = ConnectionKeeper(self.using)
        while True:
            with self._lock:
                while not self._queue:
                    if self._release_requested:
                        keeper.broken()
                        self._release_requested = False
                        self._released.set()
                    self._queued.wait()
                batch, self._queue = self._queue, {}
            failures: dict[Producer, BaseException] = {}
            try:
                keeper.ready()
                stored = _store_batch(self.using, batch)
                stored.set_stream_ids()
                stored.deliver()
                failures = stored.failures
            except Exception as exc:
                logger.exception("Could not store %d stream writes.", sum(map(len, batch.values())))
                failures = dict.fromkeys(
                    batch, WriteFailed(f"a stream write could not be stored: {exc}")
                )
                # A broken connection must not poison the next batch.
                keeper.broken()
            with self._lock:
                for execution, writes in batch.items():
                    execution.stored += len(writes)
                    execution.pending_bytes -= sum(w.size for w in writes)
                    if execution in failures and execution.write_error is None:
                        execution.write_error = failures[execution]
                        execution.stop_reason = str(failures[execution])
                        execution.stop.set()
                self._stored.notify_all()


class _EntryRow(NamedTuple):
    """A value to insert."""

    workflow_id: str
    key: str
    offset: int
    text: str  # JSON
    operation: int | None


@dataclass
class _Stored:
    """What one transaction stored, to apply once it has committed."""

    using: str
    failures: dict[Producer, BaseException]
    created: list[tuple[Producer, str, int]]
    hooks: list[StreamCommitted]

    def set_stream_ids(self) -> None:
        for execution, key, stream_id in self.created:
            execution.set_stream_id(key, stream_id)

    def deliver(self) -> None:
        written = sum(len(hook.texts) for hook in self.hooks)
        if written:
            telemetry.values_written(written)
        publish_streams(self.hooks, self.using)


@dataclass
class _StreamChange:
    """What a batch changes in one stream's row."""

    execution: Producer
    key: str
    stream_id: int | None  # None: the batch creates the row
    length: int | None = None  # None: unchanged
    closed: bool = False
    close_operation: int | None = None


@dataclass
class _Plan:
    """A batch, laid out as the rows to write."""

    streams: dict[tuple[str, str], _StreamChange]
    entries: list[_EntryRow]
    hooks: dict[str, list[StreamCommitted]]
    steps: list[Step]


def _plan(batch: dict[Producer, list[Pending]]) -> _Plan:
    plan = _Plan({}, [], {}, [])
    for execution, writes in batch.items():
        workflow_id = execution.workflow_id
        hooks = plan.hooks.setdefault(workflow_id, [])
        runs: dict[str, tuple[int, list[str]]] = {}
        for write in writes:
            if isinstance(write, PendingCheckpoint):
                plan.steps.append(write.step)
                continue
            change = plan.streams.get((workflow_id, write.key))
            if change is None:
                change = plan.streams[workflow_id, write.key] = _StreamChange(
                    execution, write.key, execution.stream_id(write.key)
                )
            if write.text is None:
                change.closed = True
                change.close_operation = write.operation
                hooks.append(
                    StreamCommitted(workflow_id, write.key, write.offset, [], write.offset)
                )
            else:
                plan.entries.append(
                    _EntryRow(workflow_id, write.key, write.offset, write.text, write.operation)
                )
                change.length = write.offset + 1
                runs.setdefault(write.key, (write.offset, []))[1].append(write.text)
        for key, (first, texts) in runs.items():
            hooks.append(StreamCommitted(workflow_id, key, first, texts, None))
    return plan


def _store_batch(using: str, batch: dict[Producer, list[Pending]]) -> _Stored:
    """Store ``batch``: in one statement where the backend has one (it commits on its own
    outside a transaction), elsewhere in a transaction (a savepoint inside one)."""
    if backend_for(using).one_statement:
        return _store_in_one_statement(using, batch)
    with transaction.atomic(using=using):
        return _store_with_the_orm(using, batch)


def _store_with_the_orm(using: str, batch: dict[Producer, list[Pending]]) -> _Stored:
    now = timezone.now()
    take_write_lock(using)
    held = _fence(using, batch)
    stored = _Stored(
        using,
        {e: e.lease_lost_error() for e in batch if e.workflow_id not in held},
        [],
        [],
    )
    plan = _plan({e: w for e, w in batch.items() if e.workflow_id in held})
    streams = Stream.objects.using(using)
    ids: dict[tuple[str, str], int] = {}
    for (workflow_id, key), change in plan.streams.items():
        fields: dict[str, object] = {}
        if change.length is not None:
            fields["length"] = change.length
        if change.closed:
            fields["closed_at"] = now
            fields["close_operation"] = change.close_operation
        if change.stream_id is None:
            stream = streams.create(workflow_id=workflow_id, key=key, created_at=now, **fields)
            ids[workflow_id, key] = stream.pk
            stored.created.append((change.execution, key, stream.pk))
        else:
            ids[workflow_id, key] = change.stream_id
            streams.filter(pk=change.stream_id).update(**fields)
    entries = [
        StreamEntry(
            stream_id=ids[workflow_id, key],
            offset=offset,
            value=text,
            operation=operation,
            created_at=now,
        )
        for workflow_id, key, offset, text, operation in plan.entries
    ]
    limit = backend_for(using).max_statement_bytes()
    for chunk in _by_size(entries, limit, lambda entry: entry.value):
        StreamEntry.objects.using(using).bulk_create(chunk, batch_size=1000)
    for steps in _by_size(plan.steps, limit, lambda step: (step.output or "") + (step.error or "")):
        Step.objects.using(using).bulk_create(steps)
    if plan.steps:
        Workflow.objects.using(using).filter(
            pk__in={step.workflow_id for step in plan.steps}
        ).update(lease_expires_at=_lease_until())
    stored.hooks = [hook for hooks in plan.hooks.values() for hook in hooks]
    return stored


def _by_size(
    rows: list[_Row], limit: int | None, text: Callable[[_Row], str]
) -> Iterator[list[_Row]]:
    """``rows`` in runs whose texts stay well within a server's statement size limit."""
    if limit is None:
        if rows:
            yield rows
        return
    budget = limit // 2  # room for the statement's other columns and its escaping
    run: list[_Row] = []
    size = 0
    for row in rows:
        row_size = len(text(row).encode()) + 256
        if run and size + row_size > budget:
            yield run
            run, size = [], 0
        run.append(row)
        size += row_size
    if run:
        yield run


def _lease_until() -> datetime:
    return timezone.now() + timedelta(seconds=get_config().LEASE_SECONDS)


def _store_in_one_statement(using: str, batch: dict[Producer, list[Pending]]) -> _Stored:
    now = timezone.now()
    plan = _plan(batch)
    new = [c for c in plan.streams.values() if c.stream_id is None]
    old = [c for c in plan.streams.values() if c.stream_id is not None]
    params = {
        "now": now,
        "held_ids": [e.workflow_id for e in batch],
        "held_owners": [e.worker_id for e in batch],
        "new_workflows": [c.execution.workflow_id for c in new],
        "new_keys": [c.key for c in new],
        "new_lengths": [c.length for c in new],
        "new_closed": [now if c.closed else None for c in new],
        "new_close_operations": [c.close_operation for c in new],
        "old_ids": [c.stream_id for c in old],
        "old_workflows": [c.execution.workflow_id for c in old],
        "old_lengths": [c.length for c in old],
        "old_closed": [now if c.closed else None for c in old],
        "old_close_operations": [c.close_operation for c in old],
        "entry_streams": [plan.streams[w, k].stream_id for w, k, _, _, _ in plan.entries],
        "entry_workflows": [w for w, _, _, _, _ in plan.entries],
        "entry_keys": [k for _, k, _, _, _ in plan.entries],
        "entry_offsets": [offset for _, _, offset, _, _ in plan.entries],
        "entry_values": [text for _, _, _, text, _ in plan.entries],
        "entry_operations": [operation for _, _, _, _, operation in plan.entries],
        "lease_until": _lease_until(),
        "step_workflows": [step.workflow_id for step in plan.steps],
        "step_operations": [step.operation for step in plan.steps],
        "step_names": [step.name for step in plan.steps],
        "step_statuses": [step.status for step in plan.steps],
        "step_outputs": [step.output for step in plan.steps],
        "step_errors": [step.error for step in plan.steps],
        "step_attempts": [step.attempts for step in plan.steps],
        "step_started": [step.started_at for step in plan.steps],
        "step_finished": [step.finished_at for step in plan.steps],
    }
    rows = backend_for(using).store_batch(params)
    held = {workflow_id for workflow_id, key, _ in rows if workflow_id is not None and key is None}
    stored = _Stored(
        using, {e: e.lease_lost_error() for e in batch if e.workflow_id not in held}, [], []
    )
    for workflow_id, key, stream_id in rows:
        if key is not None:
            execution = plan.streams[workflow_id, key].execution
            stored.created.append((execution, key, stream_id))
    for workflow_id, hooks in plan.hooks.items():
        if workflow_id in held:
            stored.hooks.extend(hooks)
    return stored


def store_in_transaction(execution: Producer, write: PendingWrite) -> None:
    """Store one write in the caller's open transaction (an atomic step's).

    The value commits, or rolls back, with the step. Going through the writer
    thread instead would deadlock: its transaction would wait for the workflow's
    row, which the step's transaction holds until the step ends.
    """
    stored = _store_batch(execution.using, {execution: [write]})
    if stored.failures:
        raise stored.failures[execution]
    stored.set_stream_ids()
    transaction.on_commit(stored.deliver, using=execution.using)


def _fence(using: str, batch: dict[Producer, list[Pending]]) -> set[str]:
    """Lock the rows of the batch's workflows; return the ids their workers still hold.

    The lock keeps another worker from reclaiming them until the values commit. The
    heartbeat renews leases: renewing them here too would write a new version of
    each workflow's row with every batch.
    """
    by_worker: dict[str, list[str]] = defaultdict(list)
    for execution in batch:
        by_worker[execution.worker_id].append(execution.workflow_id)
    held: set[str] = set()
    runs = Workflow.objects.using(using)
    for worker_id, workflow_ids in by_worker.items():
        held.update(runs.lock_held(worker_id, workflow_ids, None))
    return held


def _raise_write_error(execution: Producer) -> None:
    error = execution.write_error
    if error is None:
        return
    if isinstance(error, LeaseLost):
        raise LeaseLost(str(error))
    raise Interrupted(str(error))


_committers: dict[str, GroupCommitter] = {}
_committers_lock = threading.Lock()


def committer(using: str) -> GroupCommitter:
    with _committers_lock:
        instance = _committers.get(using)
        if instance is None:
            instance = _committers[using] = GroupCommitter(using)
        return instance


def release_connections() -> None:
    """Close every writer thread's connection (a stopping worker, a test database to drop)."""
    with _committers_lock:
        instances = list(_committers.values())
    for instance in instances:
        instance.release_connection()
