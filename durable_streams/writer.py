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
from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from . import delivery
from .db import ConnectionKeeper, take_write_lock
from .exceptions import LeaseLost
from .models import Stream, StreamEntry, Workflow
from .notify import announce, stream_topic

if TYPE_CHECKING:
    from .runtime import Execution

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


class WriteFailed(Exception):
    """The writer thread could not store queued writes; the run must stop and replay."""


class GroupCommitter:
    def __init__(self, using: str) -> None:
        self.using = using
        self._cond = threading.Condition()
        self._queue: dict[Execution, list[PendingWrite]] = {}
        self._release_requested = False
        self._released = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"durable-streams-writer-{using}", daemon=True
        )
        self._thread.start()

    def submit(self, execution: Execution, write: PendingWrite) -> None:
        size = len(write.text or "")
        with self._cond:
            while execution.write_error is None and (
                execution.submitted - execution.stored >= MAX_PENDING_VALUES
                or (
                    execution.pending_bytes + size > MAX_PENDING_BYTES
                    and execution.submitted > execution.stored
                )
            ):
                self._cond.wait(1.0)
            _raise_write_error(execution)
            self._queue.setdefault(execution, []).append(write)
            execution.submitted += 1
            execution.pending_bytes += size
            self._cond.notify_all()

    def flush(self, execution: Execution) -> None:
        """Wait until everything ``execution`` queued is stored; raise if it could not be."""
        with self._cond:
            while execution.stored < execution.submitted and execution.write_error is None:
                self._cond.wait(1.0)
            _raise_write_error(execution)

    def release_connection(self, timeout: float = 5.0) -> None:
        """Close the writer thread's connection once its queue is empty."""
        with self._cond:
            self._released.clear()
            self._release_requested = True
            self._cond.notify_all()
        self._released.wait(timeout)

    def _run(self) -> None:
        keeper = ConnectionKeeper(self.using)
        while True:
            with self._cond:
                while not self._queue:
                    if self._release_requested:
                        keeper.broken()
                        self._release_requested = False
                        self._released.set()
                    self._cond.wait()
                batch, self._queue = self._queue, {}
            failures: dict[Execution, BaseException] = {}
            try:
                keeper.ready()
                with transaction.atomic(using=self.using):
                    stored = _store(self.using, batch)
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
            with self._cond:
                for execution, writes in batch.items():
                    execution.stored += len(writes)
                    execution.pending_bytes -= sum(len(w.text or "") for w in writes)
                    if execution in failures and execution.write_error is None:
                        execution.write_error = failures[execution]
                        execution.stop_reason = str(failures[execution])
                        execution.stop.set()
                self._cond.notify_all()


@dataclass
class _Stored:
    """What one transaction stored, to apply once it has committed."""

    failures: dict[Execution, BaseException]
    created: list[tuple[Execution, str, int]]
    hooks: list[tuple[str, str, int, list[str], int | None]]

    def set_stream_ids(self) -> None:
        for execution, key, stream_id in self.created:
            execution.set_stream_id(key, stream_id)

    def deliver(self) -> None:
        _deliver(self.hooks)


def _store(using: str, batch: dict[Execution, list[PendingWrite]]) -> _Stored:
    """Store ``batch`` in the current transaction; the caller commits it."""
    now = timezone.now()
    stored = _Stored({}, [], [])
    take_write_lock(using)
    held = _fence(using, batch)
    entries: list[StreamEntry] = []
    updates: dict[int, dict[str, object]] = {}
    topics: list[str] = []
    for execution, writes in batch.items():
        if execution.workflow_id not in held:
            stored.failures[execution] = LeaseLost(
                f"Worker {execution.worker_id!r} no longer holds workflow "
                f"{execution.workflow_id!r}."
            )
            continue
        new_ids: dict[str, int] = {}
        runs: dict[str, tuple[int, list[str]]] = {}
        for write in writes:
            stream_id = new_ids.get(write.key) or execution.stream_id(write.key)
            if stream_id is None:
                stream = Stream.objects.using(using).create(
                    workflow_id=execution.workflow_id, key=write.key, created_at=now
                )
                stream_id = new_ids[write.key] = stream.pk
                stored.created.append((execution, write.key, stream_id))
            update = updates.setdefault(stream_id, {})
            if write.text is None:
                update["closed_at"] = now
                update["close_operation"] = write.operation
                stored.hooks.append(
                    (execution.workflow_id, write.key, write.offset, [], write.offset)
                )
            else:
                entries.append(
                    StreamEntry(
                        stream_id=stream_id,
                        offset=write.offset,
                        value=write.text,
                        operation=write.operation,
                        created_at=now,
                    )
                )
                update["length"] = write.offset + 1
                runs.setdefault(write.key, (write.offset, []))[1].append(write.text)
            topics.append(stream_topic(execution.workflow_id, write.key))
        for key, (first, texts) in runs.items():
            stored.hooks.append((execution.workflow_id, key, first, texts, None))
    StreamEntry.objects.using(using).bulk_create(entries, batch_size=1000)
    for stream_id, fields in updates.items():
        Stream.objects.using(using).filter(pk=stream_id).update(**fields)
    announce(topics, using)
    return stored


def store_in_transaction(execution: Execution, write: PendingWrite) -> None:
    """Store one write in the caller's open transaction (an atomic step's).

    The value commits, or rolls back, with the step. Going through the writer
    thread instead would deadlock: its transaction would wait for the workflow's
    row, which the step's transaction holds until the step ends.
    """
    stored = _store(execution.using, {execution: [write]})
    if stored.failures:
        raise stored.failures[execution]
    stored.set_stream_ids()
    transaction.on_commit(stored.deliver, using=execution.using)


def _fence(using: str, batch: dict[Execution, list[PendingWrite]]) -> set[str]:
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


def _deliver(hooks: list[tuple[str, str, int, list[str], int | None]]) -> None:
    # Values first, then closes, so a subscriber never sees a close before the last value.
    for workflow_id, key, first, texts, closed_length in sorted(
        hooks, key=lambda h: h[4] is not None
    ):
        try:
            if closed_length is None:
                delivery.entries_committed(workflow_id, key, first, texts)
            else:
                delivery.stream_closed(workflow_id, key, closed_length)
        except Exception:
            logger.exception(
                "[%s] Live delivery of stream %r failed; readers catch up.", workflow_id, key
            )


def _raise_write_error(execution: Execution) -> None:
    error = execution.write_error
    if error is None:
        return
    if isinstance(error, LeaseLost):
        raise LeaseLost(str(error))
    from .runtime import Interrupted

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
