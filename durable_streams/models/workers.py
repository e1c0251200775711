"""The worker processes that are running, as each one reports itself."""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import datetime, timedelta

from django.db import models, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..conf import get_config
from ..db import take_write_lock

# A worker whose heartbeat is older than this many WORKER_HEARTBEAT_SECONDS counts as gone.
GONE_AFTER_BEATS = 3
# Largest JSON text of the workflow names one row keeps. Beyond it the row keeps the
# names that fit (in sorted order) and says it is incomplete: while such a worker is
# alive nobody can tell which names no worker knows, so none is reported.
NAMES_CHARS = 64_000
# Rows of gone workers one sweep deletes, at most.
SWEEP_BATCH = 100


def gone_after() -> timedelta:
    return timedelta(seconds=GONE_AFTER_BEATS * get_config().WORKER_HEARTBEAT_SECONDS)


def encode_names(names: Collection[str]) -> tuple[str, bool]:
    """The JSON text of ``names`` within NAMES_CHARS, and whether all of them fit."""
    kept: list[str] = []
    size = 2  # the brackets
    for name in sorted(set(names)):
        cost = len(json.dumps(name)) + (1 if kept else 0)
        if size + cost > NAMES_CHARS:
            return json.dumps(kept), False
        kept.append(name)
        size += cost
    return json.dumps(kept), True


class WorkerProcessQuerySet(models.QuerySet["WorkerProcess"]):
    def live(self, now: datetime | None = None) -> WorkerProcessQuerySet:
        return self.filter(heartbeat_at__gte=(now or timezone.now()) - gone_after())

    def gone(self, now: datetime | None = None) -> WorkerProcessQuerySet:
        """Rows whose worker stopped beating: killed, frozen, or cut off from the database."""
        return self.filter(heartbeat_at__lt=(now or timezone.now()) - gone_after())

    def register(
        self,
        worker_id: str,
        *,
        hostname: str,
        pid: int,
        process_started_at: datetime,
        queues: Collection[str],
        concurrency: int,
        names: Collection[str],
    ) -> WorkerProcess:
        """Insert (or replace, for a worker id used again) the row of a starting worker."""
        now = timezone.now()
        text, complete = encode_names(names)
        with transaction.atomic(using=self.db):
            # A read, then a write: on a database that locks the file, a writer from the
            # start, or a concurrent writer makes the upgrade fail at once ("locked").
            take_write_lock(self.db)
            row, _ = self.update_or_create(
                worker_id=worker_id,
                defaults={
                    "hostname": hostname[:255],
                    "pid": pid,
                    "process_started_at": process_started_at,
                    "started_at": now,
                    "heartbeat_at": now,
                    "queues": json.dumps(list(queues)),
                    "concurrency": concurrency,
                    "workflows": text,
                    "workflows_complete": complete,
                },
            )
        return row

    def beat(self, worker_id: str) -> bool:
        """Refresh the heartbeat; False if the row is gone (swept while this worker was
        cut off), so that the worker registers again."""
        return bool(self.filter(pk=worker_id).update(heartbeat_at=timezone.now()))

    def sweep(self, limit: int = SWEEP_BATCH) -> int:
        """Delete up to ``limit`` rows of gone workers; return how many."""
        ids = list(self.gone().order_by("heartbeat_at").values_list("pk", flat=True)[:limit])
        if not ids:
            return 0
        # The filter again: a worker that beat meanwhile keeps its row.
        deleted, _ = self.gone().filter(pk__in=ids).delete()
        return deleted

    def known_names(self) -> set[str] | None:
        """The workflow names that some live worker has registered, in one query.

        None when a live worker's list was cut at NAMES_CHARS: then any name may be known.
        """
        known: set[str] = set()
        for text, complete in self.live().values_list("workflows", "workflows_complete"):
            if not complete:
                return None
            known.update(json.loads(text))
        return known


class WorkerProcess(models.Model):
    """One running ``runworkers`` process (or any started Worker), kept alive by its heartbeat."""

    worker_id = models.CharField(_("worker id"), primary_key=True, max_length=255)
    hostname = models.CharField(_("host"), max_length=255)
    pid = models.PositiveIntegerField(_("process id"))
    process_started_at = models.DateTimeField(_("process started at"))
    started_at = models.DateTimeField(_("worker started at"))
    heartbeat_at = models.DateTimeField(_("last heartbeat"), db_index=True)
    queues = models.TextField(_("queues"), help_text=_("JSON list"))
    concurrency = models.PositiveIntegerField(_("concurrency"))
    workflows = models.TextField(
        _("registered workflows"),
        help_text=_("JSON list of names, cut at 64,000 characters"),
    )
    workflows_complete = models.BooleanField(
        _("all workflows listed"),
        default=True,
        help_text=_("False when the list was cut at its size limit."),
    )

    objects = WorkerProcessQuerySet.as_manager()

    class Meta:
        verbose_name = _("worker process")
        verbose_name_plural = _("worker processes")
        ordering = ["worker_id"]

    def __str__(self) -> str:
        return self.worker_id

    @property
    def queue_list(self) -> list[str]:
        queues: list[str] = json.loads(self.queues)
        return queues

    @property
    def workflow_names(self) -> list[str]:
        names: list[str] = json.loads(self.workflows)
        return names

    def is_alive(self, now: datetime | None = None) -> bool:
        return self.heartbeat_at >= (now or timezone.now()) - gone_after()
