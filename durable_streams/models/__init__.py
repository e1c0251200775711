"""Workflows, their step checkpoints, and their streams."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import models, transaction
from django.db.models import Exists, F, Min, OuterRef, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..backends import backend_for
from ..conf import get_config
from ..db import take_write_lock
from .sql import ENTRIES, HISTORY, POSITION, chunks, table_sql
from .states import (
    ACTIVE_STATUSES,
    NO_CHANGES,
    RESUMABLE_STATUSES,
    TERMINAL_STATUSES,
    Changes,
    Claim,
    Ended,
    HistoryRow,
    Status,
    StreamPosition,
    StreamState,
    new_workflow_id,
    stream_state,
)
from .workers import WorkerProcess, WorkerProcessQuerySet

__all__ = [
    "ACTIVE_STATUSES",
    "NO_CHANGES",
    "RESUMABLE_STATUSES",
    "TERMINAL_STATUSES",
    "Changes",
    "Claim",
    "Ended",
    "HistoryRow",
    "Event",
    "Message",
    "Status",
    "Step",
    "Stream",
    "StreamEntry",
    "StreamPosition",
    "StreamState",
    "WorkerProcess",
    "WorkerProcessQuerySet",
    "Workflow",
    "new_workflow_id",
    "stream_state",
]

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence


class WorkflowQuerySet(models.QuerySet["Workflow"]):
    def active(self) -> WorkflowQuerySet:
        return self.filter(status__in=ACTIVE_STATUSES)

    def terminal(self) -> WorkflowQuerySet:
        return self.filter(status__in=TERMINAL_STATUSES)

    def claimable(self, queues: Collection[str], names: Collection[str]) -> WorkflowQuerySet:
        """Enqueued workflows, running ones whose worker's lease ran out, and waiting ones
        whose timer is due or whose message arrived, oldest first."""
        now = timezone.now()
        arrived = Message.objects.filter(
            destination_id=OuterRef("pk"),
            topic=OuterRef("wait_topic"),
            consumed_operation__isnull=True,
        )
        return self.filter(
            Q(status=Status.ENQUEUED)
            | Q(status=Status.RUNNING, lease_expires_at__lt=now)
            | (Q(status=Status.WAITING) & (Q(wake_at__lte=now) | Exists(arrived))),
            queue__in=queues,
            name__in=names,
        ).order_by("created_at")

    def next_wake(self, queues: Collection[str], names: Collection[str]) -> datetime | None:
        """The earliest timer of the waiting workflows of ``queues`` (a sleep's wake time,
        a recv's deadline), or None: how long an idle worker may wait for work."""
        wake: datetime | None = self.filter(
            status=Status.WAITING, wake_at__isnull=False, queue__in=queues, name__in=names
        ).aggregate(wake=Min("wake_at"))["wake"]
        return wake

    def suspend(
        self,
        worker_id: str,
        workflow_id: str,
        operation: int,
        topic: str | None,
        wake_at: datetime | None,
    ) -> tuple[bool, Changes]:
        """Leave a run this worker holds waiting at ``operation``: a sleep until ``wake_at``,
        or a recv on ``topic`` (until ``wake_at``, if it has a timeout).

        The lease is let go and the attempt not counted. False if the worker no longer
        holds it. The change to publish is its queue: a message that arrived just
        before the suspension committed makes it claimable at once, and idle workers
        learn of its timer.
        """
        with transaction.atomic(using=self.db):
            take_write_lock(self.db)
            held = self.held_by(worker_id).filter(pk=workflow_id)
            queue = held.values_list("queue", flat=True).first()
            changed = held.update(
                status=Status.WAITING,
                lease_owner=None,
                lease_expires_at=None,
                attempts=F("attempts") - 1,
                updated_at=timezone.now(),
                wait_operation=operation,
                wait_topic=topic,
                wake_at=wake_at,
            )
        if not changed or queue is None:
            return False, NO_CHANGES
        return True, Changes(queues=(queue,))

    def wait_of(self, workflow_id: str) -> tuple[int | None, datetime | None]:
        """The operation and the deadline of the wait a run was last suspended in."""
        row = self.filter(pk=workflow_id).values_list("wait_operation", "wake_at").first()
        return (None, None) if row is None else row

    def enqueue(self, run: Workflow) -> tuple[bool, Changes]:
        """Insert the new ``run``; its queue is the change to announce to idle workers.

        False, with nothing written, if its id is taken. One statement, inside a
        transaction too: a taken id is skipped, not an error that would break the
        transaction, so no savepoint is needed.
        """
        if not backend_for(self.db).insert_unless_taken(run):
            return False, NO_CHANGES
        run._state.adding, run._state.db = False, self.db
        return True, Changes(queues=(run.queue,))

    def history(self, workflow_id: str) -> list[HistoryRow]:
        """What the runs of a workflow recorded, as rows of one query.

        ``("step", operation, name, None, None, None)`` for each step checkpoint,
        ``("write_stream", operation, key, None, None, None)`` for each value the workflow
        body wrote, and ``("stream", close operation, key, id, length, closed)`` for
        each stream.
        """
        rows = backend_for(self.db).fetch(table_sql(self.db, HISTORY), [workflow_id] * 3)
        return [HistoryRow(*row) for row in rows]

    def exhausted(self, queues: Collection[str], names: Collection[str]) -> WorkflowQuerySet:
        """Claimable workflows that used all their attempts: nobody runs them again."""
        return self.claimable(queues, names).filter(attempts__gte=F("max_attempts"))

    def claim(
        self,
        worker_id: str,
        queues: Collection[str],
        names: Collection[str],
        limit: int,
        *,
        lease_until: datetime,
        exclude: Collection[str] = (),
    ) -> list[Claim]:
        """Lease up to ``limit`` claimable workflows with attempts left to ``worker_id``.

        Oldest first, skipping rows that other workers are claiming at the same moment,
        and counting an attempt for each. Returns what the worker needs to run them.
        Where the backend has a statement of its own this is one statement over the
        whole table (call it on the manager); elsewhere a transaction of three.
        """
        if limit < 1 or not names:
            return []
        now = timezone.now()
        backend = backend_for(self.db)
        if backend.one_statement:
            params = {
                "queues": list(queues),
                "names": list(names),
                "exclude": list(exclude),
                "now": now,
                "limit": limit,
                "worker": worker_id,
                "until": lease_until,
            }
            return [Claim(*row) for row in backend.claim(params)]
        with transaction.atomic(using=self.db):
            take_write_lock(self.db)
            picked_rows = list(
                self.claimable(queues, names)
                .filter(attempts__lt=F("max_attempts"))
                .exclude(pk__in=list(exclude))
                .select_for_update(skip_locked=True)
                .values_list("pk", "status", "lease_owner")[:limit]
            )
            if not picked_rows:
                return []
            ids = [pk for pk, _, _ in picked_rows]
            self.filter(pk__in=ids).update(
                status=Status.RUNNING,
                lease_owner=worker_id,
                lease_expires_at=lease_until,
                attempts=F("attempts") + 1,
                updated_at=now,
                started_at=Coalesce("started_at", Value(now)),
            )
            details = {}
            # A run that was ever suspended has a wait to load (a recv's deadline).
            suspended = set()
            for pk, name, inputs, attempts, wait_operation in self.filter(pk__in=ids).values_list(
                "pk", "name", "inputs", "attempts", "wait_operation"
            ):
                details[pk] = (name, inputs, attempts)
                if wait_operation is not None:
                    suspended.add(pk)
            recorded = set(
                Step.objects.using(self.db)
                .filter(workflow_id__in=ids)
                .order_by()
                .values_list("workflow_id", flat=True)
                .union(
                    Stream.objects.using(self.db)
                    .filter(workflow_id__in=ids)
                    .order_by()
                    .values_list("workflow_id", flat=True)
                )
            )
        return [
            Claim(
                pk,
                *details[pk],
                status,
                owner,
                status in (Status.RUNNING, Status.WAITING) or pk in recorded | suspended,
            )
            for pk, status, owner in picked_rows
        ]

    def held_by(self, worker_id: str) -> WorkflowQuerySet:
        return self.filter(status=Status.RUNNING, lease_owner=worker_id)

    def lock_held(
        self, worker_id: str, workflow_ids: Collection[str], until: datetime | None
    ) -> set[str]:
        """Lock and extend (unless ``until`` is None) this worker's leases; return the ids
        it still holds.

        Call inside a transaction. Rows are locked in primary-key order, so two
        transactions of one worker (lease renewal, stream writes) cannot deadlock.
        """
        held = set(
            self.held_by(worker_id)
            .filter(pk__in=workflow_ids)
            .order_by("pk")
            .select_for_update()
            .values_list("pk", flat=True)
        )
        if held and until is not None:
            self.filter(pk__in=held).update(lease_expires_at=until)
        return held

    def renew_leases(
        self, worker_id: str, workflow_ids: Collection[str], until: datetime
    ) -> set[str]:
        """Extend this worker's leases without waiting on row locks; return the ids it holds.

        Call inside a transaction. A row that another transaction has locked is not
        waited for: an atomic step keeps its workflow's row locked while it runs, and
        the worker's other leases must not lapse meanwhile (that step's checkpoint
        renews its own lease). Such a row counts as held if it still is.
        """
        held = self.held_by(worker_id).filter(pk__in=workflow_ids)
        renewed = set(
            held.order_by("pk").select_for_update(skip_locked=True).values_list("pk", flat=True)
        )
        if renewed:
            self.filter(pk__in=renewed).update(lease_expires_at=until)
        busy = set(workflow_ids) - renewed
        if busy:
            renewed.update(held.filter(pk__in=busy).values_list("pk", flat=True))
        return renewed

    def finish(
        self,
        workflow_id: str,
        status: str,
        *,
        output: str | None = None,
        error: str | None = None,
    ) -> tuple[bool, Changes]:
        """End one workflow of this queryset: record the final status and close its open
        streams in one transaction. False if the queryset no longer matches it; else the
        end is the change to publish.
        """
        now = timezone.now()
        if backend_for(self.db).one_statement:
            query = self.filter(pk=workflow_id).order_by().values("pk").query
            target_sql, params = query.get_compiler(self.db).as_sql()
            return self._finish_in_one_statement(
                workflow_id, status, output, error, target_sql, params
            )
        with transaction.atomic(using=self.db):
            # The UPDATE comes first: it is the fence, and it takes the row lock.
            changed = self.filter(pk=workflow_id).update(
                status=status,
                output=output,
                error=error,
                finished_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
            if changed:
                Stream.objects.using(self.db).filter(
                    workflow_id=workflow_id, closed_at__isnull=True
                ).update(closed_at=now, closed_by_end=True)
        if not changed:
            return False, NO_CHANGES
        return True, Changes(ended=(Ended(workflow_id, status),))

    def finish_held(
        self,
        worker_id: str,
        workflow_id: str,
        status: str,
        *,
        output: str | None = None,
        error: str | None = None,
    ) -> tuple[bool, Changes]:
        """``held_by(worker_id).finish(...)``: how a worker ends the runs it holds.

        Where the backend has statements of its own, this one is written once, not
        compiled from a queryset at every end. Call it on the manager (or an
        unfiltered queryset).
        """
        backend = backend_for(self.db)
        if not backend.one_statement:
            return self.held_by(worker_id).finish(workflow_id, status, output=output, error=error)
        target_sql = backend.held_target()
        return self._finish_in_one_statement(
            workflow_id, status, output, error, target_sql, [workflow_id, worker_id]
        )

    def _finish_in_one_statement(
        self,
        workflow_id: str,
        status: str,
        output: str | None,
        error: str | None,
        target_sql: str,
        target_params: Sequence[Any],
    ) -> tuple[bool, Changes]:
        """The backend's ``finish()`` for the rows that ``target_sql`` selects (as ``pk``)."""
        changed = backend_for(self.db).finish(
            target_sql, target_params, status, output, error, timezone.now()
        )
        if not changed:
            return False, NO_CHANGES
        return True, Changes(ended=(Ended(workflow_id, status),))

    def release(
        self, worker_id: str, workflow_ids: Collection[str], *, count_attempt: bool = False
    ) -> tuple[int, Changes]:
        """Hand running workflows back to the queue, by default without counting the attempt.

        Their queues are the change to announce, so that idle workers take them over at once.
        """
        with transaction.atomic(using=self.db):
            take_write_lock(self.db)
            held = self.held_by(worker_id).filter(pk__in=workflow_ids)
            queues = set(held.values_list("queue", flat=True))
            released = held.update(
                status=Status.ENQUEUED,
                lease_owner=None,
                lease_expires_at=None,
                attempts=F("attempts") if count_attempt else F("attempts") - 1,
                updated_at=timezone.now(),
            )
        if not released:
            return 0, NO_CHANGES
        return released, Changes(queues=tuple(sorted(queues)))

    # Operator actions (the admin uses them): resume and retry failed or cancelled runs.

    def resumable(self) -> WorkflowQuerySet:
        return self.filter(status__in=RESUMABLE_STATUSES)

    def resume(self) -> tuple[list[str], Changes]:
        """Send this queryset's failed and cancelled workflows back to the queue; return their ids.

        A worker replays each one from its checkpoints: completed steps return their
        recorded output and recorded stream writes are skipped, so nothing is written
        twice. Attempts count from zero again, the streams that the end of the run
        closed reopen, and a failed step that was the last thing the run recorded is
        forgotten so that it runs again (kept, it would fail the replay the same way).
        The changes to publish: their queues, and the workflows whose live readers
        follow the reopened streams.
        """
        now = timezone.now()
        resumed: list[str] = []
        with transaction.atomic(using=self.db):
            take_write_lock(self.db)
            rows = list(
                self.resumable().order_by("pk").select_for_update().values_list("pk", "queue")
            )
            for chunk in chunks([pk for pk, _ in rows]):
                Workflow.objects.using(self.db).filter(pk__in=chunk).update(
                    status=Status.ENQUEUED,
                    attempts=0,
                    output=None,
                    error=None,
                    started_at=None,
                    finished_at=None,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    wait_operation=None,
                    wait_topic=None,
                    wake_at=None,
                )
                Stream.objects.using(self.db).filter(
                    workflow_id__in=chunk, closed_by_end=True
                ).update(closed_at=None, closed_by_end=False)
                _forget_final_step_failures(chunk, self.db)
                resumed.extend(chunk)
        if not rows:
            return resumed, NO_CHANGES
        return resumed, Changes(queues=tuple(queue for _, queue in rows), resumed=tuple(resumed))

    def retry(self) -> tuple[list[tuple[str, str]], Changes]:
        """Start a new run of each failed or cancelled workflow of this queryset.

        The new run has a new id, the original's name, inputs, queue, owner and
        visibility, and ``retry_of`` pointing at the original; it starts from scratch.
        Return (original id, new id) pairs, and the new runs' queues as the change to publish.
        """
        now = timezone.now()
        with transaction.atomic(using=self.db):
            take_write_lock(self.db)
            originals = list(
                self.resumable()
                .order_by("created_at", "pk")
                .select_for_update()
                .values_list(
                    "pk", "name", "queue", "inputs", "owner_id", "is_public", "max_attempts"
                )
            )
            runs = [
                Workflow(
                    name=name,
                    queue=queue,
                    inputs=inputs,
                    owner_id=owner_id,
                    is_public=is_public,
                    max_attempts=max_attempts,
                    retry_of_id=pk,
                    created_at=now,
                    updated_at=now,
                )
                for pk, name, queue, inputs, owner_id, is_public, max_attempts in originals
            ]
            Workflow.objects.using(self.db).bulk_create(runs, batch_size=500)
        pairs = [(original[0], run.pk) for original, run in zip(originals, runs)]
        return pairs, Changes(queues=tuple(run.queue for run in runs))

    # Retention

    def ended_before(self, cutoff: datetime) -> WorkflowQuerySet:
        """Runs that ended before ``cutoff``.

        ``created_at`` is bounded too (a run ended before ``cutoff`` was created before
        it), so that the status index narrows the scan.
        """
        return self.terminal().filter(finished_at__lt=cutoff, created_at__lt=cutoff)

    def delete_batch(self, limit: int) -> tuple[int, int]:
        """Delete up to ``limit`` runs of this queryset with their steps and streams.

        One short transaction, deleting the rows of each table by the runs' ids, so
        that the tables stay writable between batches. Returns (runs, stream values)
        deleted; (0, 0) when none is left.
        """
        with transaction.atomic(using=self.db):
            take_write_lock(self.db)
            ids = list(self.order_by("created_at", "pk").values_list("pk", flat=True)[:limit])
            if not ids:
                return 0, 0
            streams = Stream.objects.using(self.db).filter(workflow_id__in=ids)
            values, _ = StreamEntry.objects.using(self.db).filter(stream__in=streams).delete()
            streams.delete()
            Step.objects.using(self.db).filter(workflow_id__in=ids).delete()
            Message.objects.using(self.db).filter(destination_id__in=ids).delete()
            Event.objects.using(self.db).filter(workflow_id__in=ids).delete()
            # Retries of these runs keep their rows; their retry_of becomes NULL.
            _, deleted = Workflow.objects.using(self.db).filter(pk__in=ids).delete()
        return deleted.get(Workflow._meta.label, 0), values


class Workflow(models.Model):
    id = models.CharField(primary_key=True, max_length=255, default=new_workflow_id, editable=False)
    name = models.CharField(_("name"), max_length=255)
    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.ENQUEUED
    )
    queue = models.CharField(_("queue"), max_length=100, default="default")
    inputs = models.TextField(_("inputs"), help_text=_("JSON: {'args': [...], 'kwargs': {...}}"))
    output = models.TextField(_("output"), null=True, blank=True, help_text=_("JSON"))
    error = models.TextField(
        _("error"), null=True, blank=True, help_text=_("JSON: type, message, traceback")
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("owner"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    is_public = models.BooleanField(
        _("public"),
        default=False,
        help_text=_("Anyone, signed in or not, may read its streams."),
    )
    retry_of = models.ForeignKey(
        "self",
        verbose_name=_("retry of"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="retries",
    )
    max_attempts = models.PositiveIntegerField(_("max attempts"))
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    lease_owner = models.CharField(_("worker"), max_length=255, null=True, blank=True)
    lease_expires_at = models.DateTimeField(_("lease expires at"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(_("updated at"), default=timezone.now)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    # The wait the run was last suspended in (status WAITING): the operation of its
    # sleep or recv, the recv's topic ("" the default topic; None for a sleep), and the
    # sleep's wake time or the recv's deadline (None: no timeout).
    wait_operation = models.PositiveIntegerField(_("wait operation"), null=True, blank=True)
    wait_topic = models.CharField(_("waits for topic"), max_length=255, null=True, blank=True)
    wake_at = models.DateTimeField(_("waits until"), null=True, blank=True)

    objects = WorkflowQuerySet.as_manager()

    class Meta:
        verbose_name = _("workflow")
        verbose_name_plural = _("workflows")
        ordering = ["-created_at"]
        indexes = [
            # The claim query: enqueued work per queue, oldest first.
            models.Index(
                fields=["queue", "created_at"],
                name="ds_workflow_enqueued_idx",
                condition=Q(status="ENQUEUED"),
            ),
            # The reclaim query: running work per queue (a row per busy worker slot),
            # whose lease is checked on the row. Leaving the lease out of every index
            # lets the database renew a lease in place (a HOT update), touching no index.
            models.Index(
                fields=["queue", "created_at"],
                name="ds_workflow_running_q_idx",
                condition=Q(status="RUNNING"),
            ),
            # The waiting runs a claim looks at (their timer or their messages).
            models.Index(
                fields=["queue", "created_at"],
                name="ds_workflow_waiting_idx",
                condition=Q(status="WAITING"),
            ),
            models.Index(fields=["status", "-created_at"], name="ds_workflow_status_idx"),
            models.Index(fields=["name", "-created_at"], name="ds_workflow_name_idx"),
            # The admin's queue filter, newest first.
            models.Index(fields=["queue", "-created_at"], name="ds_workflow_queue_idx"),
        ]
        permissions = [
            ("cancel_workflow", _("Can cancel workflows")),
            ("resume_workflow", _("Can resume workflows")),
            ("retry_workflow", _("Can retry workflows")),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in Status]),
                name="ds_workflow_status_valid",
            ),
            models.CheckConstraint(
                condition=~Q(status="RUNNING")
                | Q(lease_owner__isnull=False, lease_expires_at__isnull=False),
                name="ds_workflow_running_has_lease",
            ),
            models.CheckConstraint(
                condition=Q(max_attempts__gte=1), name="ds_workflow_max_attempts_min"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.id}"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def decoded_inputs(self) -> dict[str, Any]:
        inputs: dict[str, Any] = json.loads(self.inputs)
        return inputs

    @property
    def decoded_output(self) -> Any:
        return None if self.output is None else json.loads(self.output)

    @property
    def decoded_error(self) -> dict[str, Any] | None:
        return None if self.error is None else json.loads(self.error)

    @property
    def duration(self) -> timedelta | None:
        if self.started_at is None:
            return None
        return (self.finished_at or timezone.now()) - self.started_at


class StepQuerySet(models.QuerySet["Step"]):
    def checkpoint(self, step: Step, worker_id: str, lease_until: datetime) -> bool:
        """Store ``step`` if ``worker_id`` still holds its workflow, renewing the lease.

        False, with nothing stored, when the worker no longer holds it (fencing). Where
        the backend has a statement of its own this is one statement, committed on its
        own outside a transaction: a step's checkpoint costs one round trip. Elsewhere
        the lease UPDATE and the INSERT share a transaction.
        """
        backend = backend_for(self.db)
        if not backend.one_statement:
            held = Workflow.objects.using(self.db).held_by(worker_id).filter(pk=step.workflow_id)
            with transaction.atomic(using=self.db):
                if not held.update(lease_expires_at=lease_until):
                    return False
                step.save(using=self.db, force_insert=True)
            return True
        return backend.checkpoint(
            step, worker_id, lease_until, flush=get_config().FLUSH_EACH_CHECKPOINT
        )


class Step(models.Model):
    """The checkpoint of one step call: its output, or the error of its last attempt."""

    class Outcome(models.TextChoices):
        SUCCESS = "SUCCESS", _("Success")
        ERROR = "ERROR", _("Error")

    # Indexed by the unique (workflow, operation) constraint; an index of its own
    # would only cost every checkpoint one more index entry.
    workflow = models.ForeignKey(
        Workflow, on_delete=models.CASCADE, related_name="steps", db_index=False
    )
    operation = models.PositiveIntegerField(_("operation"))
    name = models.CharField(_("name"), max_length=255)
    status = models.CharField(_("status"), max_length=16, choices=Outcome.choices)
    output = models.TextField(_("output"), null=True, blank=True, help_text=_("JSON"))
    error = models.TextField(
        _("error"), null=True, blank=True, help_text=_("JSON: type, message, traceback")
    )
    attempts = models.PositiveIntegerField(_("attempts"), default=1)
    started_at = models.DateTimeField(_("started at"))
    finished_at = models.DateTimeField(_("finished at"))

    objects = StepQuerySet.as_manager()

    class Meta:
        verbose_name = _("step")
        verbose_name_plural = _("steps")
        ordering = ["workflow", "operation"]
        constraints = [
            models.UniqueConstraint(
                fields=["workflow", "operation"], name="ds_step_unique_operation"
            ),
            models.CheckConstraint(
                condition=Q(status__in=["SUCCESS", "ERROR"]),
                name="ds_step_status_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.operation} {self.name}"

    @property
    def duration(self) -> timedelta:
        return self.finished_at - self.started_at


class StreamQuerySet(models.QuerySet["Stream"]):
    def open(self) -> StreamQuerySet:
        return self.filter(closed_at__isnull=True)

    def position(self, workflow_id: str, key: str) -> StreamPosition | None:
        """The stream's position, in one query once it exists; None if the workflow does not.

        A stream has ended once it is closed or its workflow is no longer active; a
        stream never written to is empty and ends with its workflow. An end that the
        workflow's failure or cancellation caused is reported as an interruption.
        """
        rows = backend_for(self.db).fetch(table_sql(self.db, POSITION), [key, workflow_id])
        if not rows:
            return None
        stream_id, length, closed, closed_by_end, status = rows[0]
        state = stream_state(bool(closed), bool(closed_by_end), status)
        interrupted = status if state == StreamState.INTERRUPTED else None
        return StreamPosition(stream_id, length or 0, state != StreamState.OPEN, interrupted)


class Stream(models.Model):
    """One append-only stream of a workflow; ``length`` is the next offset to write."""

    # Indexed by the unique (workflow, key) constraint.
    workflow = models.ForeignKey(
        Workflow, on_delete=models.CASCADE, related_name="streams", db_index=False
    )
    key = models.CharField(_("key"), max_length=255)
    length = models.PositiveIntegerField(_("length"), default=0)
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    closed_at = models.DateTimeField(_("closed at"), null=True, blank=True)
    # The workflow operation that closed it, when the workflow body did.
    close_operation = models.PositiveIntegerField(null=True, blank=True)
    # Closed because the workflow ended, not by close_stream(): a resumed workflow reopens it.
    closed_by_end = models.BooleanField(default=False)

    objects = StreamQuerySet.as_manager()

    class Meta:
        verbose_name = _("stream")
        verbose_name_plural = _("streams")
        ordering = ["workflow", "key"]
        constraints = [
            models.UniqueConstraint(fields=["workflow", "key"], name="ds_stream_unique_key"),
            models.CheckConstraint(condition=~Q(key=""), name="ds_stream_key_not_empty"),
        ]

    def __str__(self) -> str:
        return self.key

    @property
    def is_closed(self) -> bool:
        """Whether the row is closed: for good, or until its workflow is resumed (``state``)."""
        return self.closed_at is not None

    @property
    def state(self) -> StreamState:
        """Open, closed or interrupted (reads the workflow's status, unless it is loaded)."""
        return stream_state(self.is_closed, self.closed_by_end, self.workflow.status)

    @property
    def is_interrupted(self) -> bool:
        return self.state == StreamState.INTERRUPTED


class StreamEntryQuerySet(models.QuerySet["StreamEntry"]):
    def from_offset(self, stream_id: int, offset: int, limit: int) -> StreamEntryQuerySet:
        return self.filter(
            stream_id=stream_id, offset__gte=offset, offset__lt=offset + limit
        ).order_by("offset")

    def texts_from(self, stream_id: int, offset: int, limit: int) -> list[tuple[int, str]]:
        """``from_offset()`` as (offset, stored JSON text) rows: readers' hot path.

        A statement written once (prepared where the backend prepares), not a queryset compiled at
        every read. Call it on the manager.
        """
        return backend_for(self.db).fetch(
            table_sql(self.db, ENTRIES), [stream_id, offset, offset + limit]
        )


class StreamEntry(models.Model):
    """One value of a stream, stored as JSON text so every JSON value round-trips exactly."""

    # Indexed by the unique (stream, offset) constraint.
    stream = models.ForeignKey(
        Stream, on_delete=models.CASCADE, related_name="entries", db_index=False
    )
    offset = models.PositiveIntegerField(_("offset"))
    value = models.TextField(_("value"), help_text=_("JSON"))
    # The workflow operation that wrote it; None when a step wrote it.
    operation = models.PositiveIntegerField(_("operation"), null=True, blank=True)
    created_at = models.DateTimeField(_("written at"), default=timezone.now)

    objects = StreamEntryQuerySet.as_manager()

    class Meta:
        verbose_name = _("stream entry")
        verbose_name_plural = _("stream entries")
        ordering = ["stream", "offset"]
        constraints = [
            models.UniqueConstraint(fields=["stream", "offset"], name="ds_entry_unique_offset"),
            models.UniqueConstraint(
                fields=["stream", "operation"],
                name="ds_entry_unique_operation",
                condition=Q(operation__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.stream_id}@{self.offset}"

    @property
    def decoded_value(self) -> Any:
        return json.loads(self.value)


class MessageQuerySet(models.QuerySet["Message"]):
    def pending(self, destination: str, topic: str) -> MessageQuerySet:
        """The messages on ``topic`` that no ``recv`` took yet, in send order."""
        return self.filter(
            destination_id=destination, topic=topic, consumed_operation__isnull=True
        ).order_by("id")


class Message(models.Model):
    """A message sent to a workflow, kept until (and after) a ``recv`` takes it."""

    # Indexed by the (destination, topic, id) index.
    destination = models.ForeignKey(
        Workflow,
        verbose_name=_("destination"),
        on_delete=models.CASCADE,
        related_name="messages",
        db_index=False,
    )
    # "" is the default topic (topic=None in the API).
    topic = models.CharField(_("topic"), max_length=255, blank=True, default="")
    value = models.TextField(_("value"), help_text=_("JSON"))
    # A sender's key: a repeated send with the same key to the same workflow is stored once.
    idempotency_key = models.CharField(_("idempotency key"), max_length=255, null=True, blank=True)
    # The workflow body and operation that sent it: a replay of the sender does not send again.
    sender = models.ForeignKey(
        Workflow,
        verbose_name=_("sender"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
    )
    sender_operation = models.PositiveIntegerField(null=True, blank=True)
    # The destination's recv operation that took it; None while it is pending.
    consumed_operation = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(_("sent at"), default=timezone.now)
    consumed_at = models.DateTimeField(_("received at"), null=True, blank=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        ordering = ["destination", "id"]
        indexes = [
            models.Index(fields=["destination", "topic", "id"], name="ds_message_topic_idx"),
        ]
        # NULLs are distinct in a unique constraint on every supported database, so
        # these hold only where the columns are set.
        constraints = [
            models.UniqueConstraint(
                fields=["destination", "idempotency_key"], name="ds_message_unique_key"
            ),
            models.UniqueConstraint(
                fields=["sender", "sender_operation"], name="ds_message_unique_send"
            ),
            models.UniqueConstraint(
                fields=["destination", "consumed_operation"], name="ds_message_unique_recv"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.destination_id}:{self.topic or '-'}#{self.pk}"

    @property
    def is_received(self) -> bool:
        return self.consumed_operation is not None

    @property
    def decoded_value(self) -> Any:
        return json.loads(self.value)


class Event(models.Model):
    """The latest value a workflow published under a key with ``set_event``."""

    # Indexed by the unique (workflow, key) constraint.
    workflow = models.ForeignKey(
        Workflow,
        verbose_name=_("workflow"),
        on_delete=models.CASCADE,
        related_name="events",
        db_index=False,
    )
    key = models.CharField(_("key"), max_length=255)
    value = models.TextField(_("value"), help_text=_("JSON"))
    # The workflow operation that set the current value; None when a step set it.
    operation = models.PositiveIntegerField(_("operation"), null=True, blank=True)
    updated_at = models.DateTimeField(_("updated at"), default=timezone.now)

    class Meta:
        verbose_name = _("event")
        verbose_name_plural = _("events")
        ordering = ["workflow", "key"]
        constraints = [
            models.UniqueConstraint(fields=["workflow", "key"], name="ds_event_unique_key"),
        ]

    def __str__(self) -> str:
        return self.key

    @property
    def decoded_value(self) -> Any:
        return json.loads(self.value)


def _forget_final_step_failures(workflow_ids: list[str], using: str) -> None:
    """Delete the failed step checkpoint that ended each run, when nothing was recorded after it.

    A failure that the workflow body caught and moved past stays: the operations
    recorded after it depend on it.
    """
    last = (
        Step.objects.using(using)
        .filter(workflow_id__in=workflow_ids)
        .values("workflow_id")
        .annotate(last=models.Max("operation"))
        .values_list("workflow_id", "last")
    )
    condition = Q()
    for workflow_id, operation in last:
        condition |= Q(workflow_id=workflow_id, operation=operation)
    if not condition:
        return
    failed = Step.objects.using(using).filter(condition, status=Step.Outcome.ERROR)
    for pk, workflow_id, operation in failed.values_list("pk", "workflow_id", "operation"):
        later_write = StreamEntry.objects.using(using).filter(
            stream__workflow_id=workflow_id, operation__gt=operation
        )
        later_close = Stream.objects.using(using).filter(
            workflow_id=workflow_id, close_operation__gt=operation
        )
        if not later_write.exists() and not later_close.exists():
            Step.objects.using(using).filter(pk=pk).delete()
