"""Cron schedules: when a scheduled workflow's ticks fall, and the run id of each tick.

A schedule is a cron expression of five fields (minute, hour, day of month, month,
day of week) or six (a field of seconds first), parsed by ``cronsim``. It is read in
the default time zone (``settings.TIME_ZONE``), so ``"0 3 * * *"`` is 3 a.m. there,
daylight saving time included; ticks are handed out as aware datetimes in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo

from cronsim import CronSim, CronSimError
from django.utils import timezone

# The run of tick T of workflow N has the id "sched:N:T", T in UTC to the second: every
# worker derives the same id for the same tick, so only one start of it can be stored.
ID_PREFIX = "sched:"
_TICK_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TICK_LENGTH = len("2026-01-01T00:00:00Z")
# The longest workflow name whose tick ids fit the 255 characters of an id.
MAX_NAME_LENGTH = 255 - len(ID_PREFIX) - 1 - _TICK_LENGTH


class Schedule:
    """A parsed cron expression: ``next_after()`` and ``latest_at()`` give its ticks."""

    def __init__(self, expression: str, *, what: str = "The schedule") -> None:
        if not isinstance(expression, str):
            raise TypeError(
                f"{what} must be a cron expression (a string), not {type(expression).__name__}."
            )
        self.expression = " ".join(expression.split())
        fields = len(self.expression.split())
        if fields not in (5, 6):
            raise ValueError(
                f"{what} {expression!r} is not a cron expression: it has {fields} fields, "
                "not 5 (minute hour day-of-month month day-of-week) or 6 (a field of "
                "seconds first)."
            )
        try:
            CronSim(self.expression, datetime.now(UTC))
        except CronSimError as exc:
            raise ValueError(
                f"{what} {expression!r} is not a valid cron expression: {exc}."
            ) from None
        if self.next_after(datetime.now(UTC)) is None:
            raise ValueError(f"{what} {expression!r} never fires (no tick in the next 50 years).")

    def __repr__(self) -> str:
        return f"<Schedule {self.expression!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and other.expression == self.expression

    def __hash__(self) -> int:
        return hash(self.expression)

    @property
    def with_seconds(self) -> bool:
        return len(self.expression.split()) == 6

    @staticmethod
    def _zone() -> tzinfo:
        return timezone.get_default_timezone()

    def next_after(self, moment: datetime) -> datetime | None:
        """The first tick strictly after ``moment`` (aware), in UTC; None if none comes."""
        local = moment.astimezone(self._zone())
        try:
            tick = next(CronSim(self.expression, local))
        except StopIteration:
            return None
        return tick.astimezone(UTC)

    def latest_at(self, moment: datetime) -> datetime | None:
        """The last tick at or before ``moment`` (aware), in UTC; None if none in 50 years."""
        # Reversed, cronsim yields the ticks before its start: start one second on.
        start = moment.astimezone(self._zone()).replace(microsecond=0) + timedelta(seconds=1)
        try:
            tick = next(CronSim(self.expression, start, reverse=True))
        except StopIteration:
            return None
        return tick.astimezone(UTC)


def tick_id(name: str, tick: datetime) -> str:
    """The workflow id of the run of ``name`` for ``tick``."""
    return id_prefix(name) + tick.astimezone(UTC).strftime(_TICK_FORMAT)


def id_prefix(name: str) -> str:
    return f"{ID_PREFIX}{name}:"


def tick_of(name: str, workflow_id: str) -> datetime | None:
    """The tick whose run has the id ``workflow_id``; None for another id."""
    prefix = id_prefix(name)
    if not workflow_id.startswith(prefix):
        return None
    try:
        return datetime.strptime(workflow_id[len(prefix) :], _TICK_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
