"""Scheduled workflows of the schedule tests.

``yearly`` is always registered: its queue is served by no worker but the tests'
own. ``every_second`` is registered only in processes started with
``DS_TEST_SCHEDULES=1``, so no other test's worker starts its ticks.
"""

from __future__ import annotations

import os
from datetime import datetime

from durable_streams import step, workflow

YEARLY_QUEUE = "schedules-yearly"


@step
def describe(tick: str) -> str:
    return tick


@workflow(name="tests.yearly_report", schedule="0 0 1 1 *", queue=YEARLY_QUEUE)
def yearly(tick: datetime) -> str:
    return describe(tick.isoformat())


if os.environ.get("DS_TEST_SCHEDULES") == "1":

    @workflow(name="tests.every_second", schedule="* * * * * *")
    def every_second(tick: datetime) -> str:
        # Fails (ERROR) unless the tick arrives as an aware datetime.
        assert tick.tzinfo is not None, tick
        return describe(tick.isoformat())
