"""Scheduled workflows: each tick started once, by whichever worker gets there first.

Every worker whose queues include a scheduled workflow's queue computes the same
ticks and starts each with the same run id (``sched:<name>:<tick>``), so the
database stores one run per tick however many workers try; the others find the id
taken and go on. No state is kept but the runs themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from django.db import DatabaseError
from django.utils import timezone

from . import cron
from .api import WorkflowFunction, WorkflowHandle, store_run
from .bus import poll_interval
from .db import alias
from .exceptions import WorkflowConflict
from .models import Workflow
from .runtime import registry

logger = logging.getLogger("durable_streams.scheduler")

__all__ = ["ScheduledWorkflow", "Scheduler", "list_schedules"]


def last_started(name: str, using: str) -> tuple[str, datetime] | None:
    """The id and tick of the newest run a tick of ``name`` started, if any."""
    ids = (
        Workflow.objects.using(using)
        .filter(name=name, id__startswith=cron.id_prefix(name))
        .order_by("-created_at")
        .values_list("id", flat=True)[:1]
    )
    for workflow_id in ids:
        tick = cron.tick_of(name, workflow_id)
        if tick is not None:
            return workflow_id, tick
    return None


class Scheduler:
    """The ticks one worker starts: those of the scheduled workflows of its queues.

    ``start_due()`` starts what is due (one INSERT per tick, no query otherwise);
    ``seconds_left()`` says how long the worker's idle wait may last before the next.
    """

    def __init__(self, queues: Collection[str], using: str) -> None:
        self.queues = list(queues)
        self.using = using
        self._next: dict[str, datetime | None] = {}
        self._retry_at = 0.0

    def start_due(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        now = timezone.now()
        try:
            for wf in registry.scheduled(self.queues):
                schedule = cast(cron.Schedule, wf.schedule)
                if wf.name not in self._next:
                    self._catch_up(wf, schedule, now)
                    self._next[wf.name] = schedule.next_after(now)
                    continue
                tick = self._next[wf.name]
                if tick is None or tick > now:
                    continue
                # Only the latest tick, should this worker have been held up past several.
                latest = schedule.latest_at(now) or tick
                self._start(wf, latest)
                self._next[wf.name] = schedule.next_after(now)
        except DatabaseError as exc:
            interval = poll_interval(self.using)
            logger.warning(
                "Could not start scheduled workflows (%s); retrying in %ss.", exc, interval
            )
            self._retry_at = time.monotonic() + interval

    def _catch_up(self, wf: registry.Registered, schedule: cron.Schedule, now: datetime) -> None:
        """At this worker's first look: start the latest tick missed while no worker ran.

        Only if the schedule has started a run before (a new schedule waits for its
        first tick) and only the latest one, never a burst of every missed tick.
        """
        latest = schedule.latest_at(now)
        if latest is None:
            return
        last = last_started(wf.name, self.using)
        if last is not None and last[1] < latest:
            self._start(wf, latest)

    def _start(self, wf: registry.Registered, tick: datetime) -> None:
        function = cast(WorkflowFunction[..., Any], wf)
        workflow_id = cron.tick_id(wf.name, tick)
        try:
            _, stored = store_run(function.using(workflow_id=workflow_id), (tick,), {})
        except WorkflowConflict as exc:
            logger.error("Scheduled tick %s of %s not started: %s", tick, wf.name, exc)
            return
        if stored:
            logger.info("Started %s for its tick %s (run %s).", wf.name, tick, workflow_id)

    def seconds_left(self) -> float | None:
        """Seconds until the next tick to start (or the next try after a failure)."""
        if time.monotonic() < self._retry_at:
            return self._retry_at - time.monotonic()
        if len(self._next) < len(registry.scheduled(self.queues)):
            return 0.0  # a schedule registered since the last look
        ticks = [tick for tick in self._next.values() if tick is not None]
        if not ticks:
            return None
        return max(0.0, (min(ticks) - timezone.now()).total_seconds())


@dataclass(frozen=True)
class ScheduledWorkflow:
    """A scheduled workflow of this process, as ``list_schedules()`` describes it."""

    name: str
    schedule: str
    queue: str
    #: The next tick (aware, UTC), None if the expression fires no more.
    next_tick: datetime | None
    #: The run of the latest tick started, and that tick; None if none was.
    last_run: WorkflowHandle | None
    last_tick: datetime | None


def list_schedules() -> list[ScheduledWorkflow]:
    """The scheduled workflows registered in this process, by name, with their next tick."""
    using = alias()
    now = timezone.now()
    found = []
    for name in sorted(registry.names()):
        wf = registry.get(name)
        if wf.schedule is None:
            continue
        last = last_started(name, using)
        found.append(
            ScheduledWorkflow(
                name=name,
                schedule=wf.schedule.expression,
                queue=wf.queue,
                next_tick=wf.schedule.next_after(now),
                last_run=None if last is None else WorkflowHandle(last[0]),
                last_tick=None if last is None else last[1],
            )
        )
    return found
