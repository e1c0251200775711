"""The states of workflows and streams, and the records that querysets hand back."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import models
from django.utils.translation import gettext_lazy as _

if TYPE_CHECKING:
    pass


def new_workflow_id() -> str:
    return str(uuid.uuid4())


class Status(models.TextChoices):
    ENQUEUED = "ENQUEUED", _("Enqueued")
    RUNNING = "RUNNING", _("Running")
    # Suspended in a sleep or a recv: no worker holds it; one claims it when its
    # timer is due or a message for it arrives.
    WAITING = "WAITING", _("Waiting")
    SUCCESS = "SUCCESS", _("Success")
    ERROR = "ERROR", _("Error")
    CANCELLED = "CANCELLED", _("Cancelled")


TERMINAL_STATUSES = frozenset({Status.SUCCESS, Status.ERROR, Status.CANCELLED})
ACTIVE_STATUSES = frozenset({Status.ENQUEUED, Status.RUNNING, Status.WAITING})
# Ended without success: an operator may resume or retry these.
RESUMABLE_STATUSES = frozenset({Status.ERROR, Status.CANCELLED})


class Claim(NamedTuple):
    """A workflow a worker has just leased, with what it needs to run it."""

    workflow_id: str
    name: str
    inputs: str
    attempts: int  # counting this one
    # RUNNING: taken over from a worker whose lease expired; WAITING: woken from a wait
    previous_status: str
    previous_owner: str | None
    # False only when no earlier run can have recorded anything: nothing to replay.
    has_history: bool = True


class Ended(NamedTuple):
    """A workflow that ended, with its final status."""

    workflow_id: str
    status: str


class HistoryRow(NamedTuple):
    """One row of ``WorkflowQuerySet.history()``: a step checkpoint, a numbered write, or a stream.

    ``stream_id``, ``length`` and ``closed`` are set for a stream only; ``operation`` is the
    close operation of a stream, None when the workflow body did not close it.
    """

    kind: str  # "step", "write_stream" or "stream"
    operation: int | None
    name: str  # the step's name, or the stream's key
    stream_id: Any
    length: Any
    closed: Any


class Changes(NamedTuple):
    """What a queryset method changed that others wait for, to be published after commit.

    Querysets change rows and return this; the caller publishes it
    (``notify.publish_changes()``) inside the same transaction, so that waiters hear of
    it once that transaction commits.
    """

    # Queues that gained work: idle workers claim it at once.
    queues: tuple[str, ...] = ()
    # Workflows that ended, with their final status: result waiters and stream readers.
    ended: tuple[Ended, ...] = ()
    # Workflows sent back to the queue: the readers of their reopened streams follow them.
    resumed: tuple[str, ...] = ()


NO_CHANGES = Changes()


class StreamState(models.TextChoices):
    """What a reader is told about a stream."""

    OPEN = "open", _("Open")
    # Final: close_stream() closed it, or its workflow ended in SUCCESS.
    CLOSED = "closed", _("Closed")
    # Its workflow ended in ERROR or CANCELLED while it was open: resuming the
    # workflow reopens it, and more values may follow.
    INTERRUPTED = "interrupted", _("Interrupted")


def stream_state(closed: bool, closed_by_end: bool, workflow_status: str | None) -> StreamState:
    """The state of a stream from its row (``closed``, ``closed_by_end``) and its workflow's status.

    A stream never written to has no row: pass ``closed=False, closed_by_end=False``.
    Only ``close_stream()`` and a successful end close a stream for good; a stream
    that was still open when its run failed or was cancelled is interrupted.
    """
    if workflow_status in RESUMABLE_STATUSES and (closed_by_end or not closed):
        return StreamState.INTERRUPTED
    if closed or workflow_status not in ACTIVE_STATUSES:
        return StreamState.CLOSED
    return StreamState.OPEN


class StreamPosition(NamedTuple):
    """Where a stream stands: its row (None before the first write), length, whether it ended.

    ``ended`` covers both ends: closed for good, or interrupted, in which case
    ``interrupted`` is the workflow's status (ERROR or CANCELLED), else None.
    """

    stream_id: int | None
    length: int
    ended: bool
    interrupted: str | None = None

    @property
    def state(self) -> StreamState:
        if not self.ended:
            return StreamState.OPEN
        return StreamState.INTERRUPTED if self.interrupted else StreamState.CLOSED
