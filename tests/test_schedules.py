"""Cron schedules: tick computation, validation at decoration, the admin's list, and
real worker processes that start each tick exactly once."""

from __future__ import annotations

import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

import durable_streams
from durable_streams import cron, workflow
from durable_streams.models import Status, Workflow
from durable_streams.scheduler import Scheduler, list_schedules
from tests.processes import worker_processes
from tests.waiting import wait_until
from tests.workflows_schedules import YEARLY_QUEUE, yearly

EVERY_SECOND = "tests.every_second"


# Ticks


def test_next_and_latest_ticks_of_a_five_field_expression() -> None:
    schedule = cron.Schedule("*/5 * * * *")
    moment = datetime(2026, 12, 2, 10, 42, 21, tzinfo=UTC)
    assert schedule.next_after(moment) == datetime(2026, 12, 2, 10, 45, tzinfo=UTC)
    assert schedule.latest_at(moment) == datetime(2026, 12, 2, 10, 40, tzinfo=UTC)
    on_tick = datetime(2026, 12, 2, 10, 45, tzinfo=UTC)
    # A tick is at or before itself, and strictly before the next one.
    assert schedule.latest_at(on_tick) == on_tick
    assert schedule.next_after(on_tick) == datetime(2026, 12, 2, 10, 50, tzinfo=UTC)
    assert schedule.latest_at(on_tick + timedelta(microseconds=1)) == on_tick


def test_six_fields_tick_every_second() -> None:
    schedule = cron.Schedule("*/2 * * * * *")
    assert schedule.with_seconds
    moment = datetime(2026, 12, 2, 10, 42, 21, 500000, tzinfo=UTC)
    assert schedule.next_after(moment) == datetime(2026, 12, 2, 10, 42, 22, tzinfo=UTC)
    assert schedule.latest_at(moment) == datetime(2026, 12, 2, 10, 42, 20, tzinfo=UTC)


@override_settings(TIME_ZONE="Europe/Paris")
def test_the_expression_is_read_in_the_default_time_zone() -> None:
    schedule = cron.Schedule("0 3 * * *")
    winter = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 2, 12, 0, tzinfo=UTC)
    # 3 a.m. in Paris: 02:00 UTC in winter, 01:00 UTC in summer; handed out in UTC.
    assert schedule.next_after(winter) == datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
    assert schedule.next_after(summer) == datetime(2026, 7, 3, 1, 0, tzinfo=UTC)
    assert schedule.next_after(winter).tzinfo is UTC


def test_tick_ids_round_trip() -> None:
    tick = datetime(2026, 12, 2, 10, 45, tzinfo=UTC)
    workflow_id = cron.tick_id("reports.nightly", tick)
    assert workflow_id == "sched:reports.nightly:2026-12-02T10:45:00Z"
    assert cron.tick_of("reports.nightly", workflow_id) == tick
    assert cron.tick_of("reports.other", workflow_id) is None
    assert cron.tick_of("reports.nightly", "sched:reports.nightly:garbage") is None


# Validation at decoration


@pytest.mark.parametrize(
    ("expression", "error", "words"),
    [
        ("every day", ValueError, "2 fields"),
        ("61 * * * *", ValueError, "not a valid cron expression: Bad minute"),
        ("* * * * * * *", ValueError, "7 fields"),
        ("0 0 31 2 *", ValueError, "not a valid cron expression"),
        (5, TypeError, "a cron expression (a string), not int"),
    ],
)
def test_a_bad_schedule_is_refused_at_decoration_naming_the_workflow(
    expression: object, error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as raised:

        @workflow(name="tests.badly_scheduled", schedule=expression)  # type: ignore[arg-type]
        def badly_scheduled(tick: datetime) -> None: ...

    assert "'tests.badly_scheduled'" in str(raised.value)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "fn",
    [lambda: None, lambda tick, other: None, lambda *, tick: None],
    ids=["none", "two", "keyword-only"],
)
def test_a_scheduled_workflow_must_take_exactly_one_argument(fn: object) -> None:
    with pytest.raises(TypeError, match="'tests.wrong_arity' must take exactly one argument"):
        workflow(name="tests.wrong_arity", schedule="* * * * *")(fn)  # type: ignore[call-overload]


def test_a_scheduled_workflow_name_must_leave_room_for_the_tick() -> None:
    name = "n" * (cron.MAX_NAME_LENGTH + 1)
    with pytest.raises(ValueError, match=f"at most {cron.MAX_NAME_LENGTH}"):
        workflow(name=name, schedule="* * * * *")(lambda tick: None)


@pytest.mark.django_db
@pytest.mark.parametrize("args", [(), ("2026-01-01",), (datetime(2026, 1, 1),)])
def test_a_scheduled_workflow_starts_only_with_an_aware_datetime(args: tuple[object]) -> None:
    with pytest.raises(TypeError, match="starts with one argument, the time of a tick"):
        yearly.start(*args)
    assert not Workflow.objects.exists()


# Starting ticks in this process


def _yearly_runs() -> list[str]:
    return sorted(Workflow.objects.filter(name=yearly.name).values_list("pk", flat=True))


@pytest.mark.django_db(transaction=True)
def test_a_new_schedule_waits_for_its_first_tick() -> None:
    scheduler = Scheduler([YEARLY_QUEUE], "default")
    scheduler.start_due()
    assert _yearly_runs() == []
    left = scheduler.seconds_left()
    assert left is not None
    next_tick = yearly.schedule.next_after(timezone.now())  # type: ignore[union-attr]
    assert abs(left - (next_tick - timezone.now()).total_seconds()) < 5


@pytest.mark.django_db(transaction=True)
def test_only_the_latest_missed_tick_is_started() -> None:
    latest = yearly.schedule.latest_at(timezone.now())  # type: ignore[union-attr]
    assert latest is not None
    three_years_ago = latest.replace(year=latest.year - 3)
    yearly.using(workflow_id=cron.tick_id(yearly.name, three_years_ago)).start(three_years_ago)
    Scheduler([YEARLY_QUEUE], "default").start_due()
    # Two ticks were missed; only the latest is started, with its tick as argument.
    assert _yearly_runs() == sorted(
        [cron.tick_id(yearly.name, three_years_ago), cron.tick_id(yearly.name, latest)]
    )
    run = Workflow.objects.get(pk=cron.tick_id(yearly.name, latest))
    assert run.status == Status.ENQUEUED
    assert run.queue == YEARLY_QUEUE
    # Another worker coming up finds it started: nothing more.
    Scheduler([YEARLY_QUEUE], "default").start_due()
    assert len(_yearly_runs()) == 2
    # A worker of other queues starts none of it.
    Workflow.objects.filter(pk=cron.tick_id(yearly.name, latest)).delete()
    Scheduler(["default"], "default").start_due()
    assert len(_yearly_runs()) == 1


@pytest.mark.django_db(transaction=True)
def test_list_schedules_and_the_admin_page() -> None:
    tick = datetime(2025, 1, 1, tzinfo=UTC)
    yearly.using(workflow_id=cron.tick_id(yearly.name, tick)).start(tick)
    found = {s.name: s for s in durable_streams.list_schedules()}
    assert found == {s.name: s for s in list_schedules()}
    listed = found[yearly.name]
    assert listed.schedule == "0 0 1 1 *"
    assert listed.queue == YEARLY_QUEUE
    assert listed.next_tick == datetime(timezone.now().year + 1, 1, 1, tzinfo=UTC)
    assert listed.last_tick == tick
    assert listed.last_run is not None
    assert listed.last_run.workflow_id == cron.tick_id(yearly.name, tick)

    url = reverse("admin:durable_streams_workflow_schedules")
    staff = User.objects.create_user("staff", password="pw", is_staff=True)
    client = Client()
    client.force_login(staff)
    assert client.get(url).status_code == 403  # no view permission
    admin = User.objects.create_superuser("admin", password="pw")
    client.force_login(admin)
    page = client.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert yearly.name in text
    assert "0 0 1 1 *" in text
    assert (
        reverse(
            "admin:durable_streams_workflow_change", args=[quote(cron.tick_id(yearly.name, tick))]
        )
        in text
    )
    changelist = client.get(reverse("admin:durable_streams_workflow_changelist"))
    assert url in changelist.content.decode()


# Real worker processes


def _ticks() -> list[tuple[str, datetime, str, str | None]]:
    rows = Workflow.objects.filter(name=EVERY_SECOND).values_list("pk", "status", "output")
    found = []
    for pk, status, output in rows:
        tick = cron.tick_of(EVERY_SECOND, pk)
        assert tick is not None, f"a run of the schedule with another id: {pk!r}"
        found.append((pk, tick, status, output))
    return sorted(found, key=lambda row: row[1])


@pytest.mark.django_db(transaction=True)
def test_three_workers_start_each_tick_exactly_once_and_survive_a_kill(tmp_path: Path) -> None:
    with worker_processes(tmp_path) as workers:
        started = [
            workers.start(f"sched-{i}", env_overrides={"DS_TEST_SCHEDULES": "1"}) for i in range(3)
        ]
        up = timezone.now()
        wait_until(lambda: len(_ticks()) >= 5, timeout=60, what="five ticks")
        started[0].process.send_signal(signal.SIGKILL)
        started[0].process.wait(10)
        killed_at = timezone.now()
        wait_until(
            lambda: sum(1 for row in _ticks() if row[1] > killed_at + timedelta(seconds=1)) >= 5,
            timeout=60,
            what="five ticks after the kill",
        )
        last = _ticks()[-1][1]
        wait_until(
            lambda: all(row[2] == Status.SUCCESS for row in _ticks() if row[1] <= last),
            timeout=60,
            what="the runs of the ticks to succeed",
        )
        logs = workers.logs()
    rows = [row for row in _ticks() if row[1] <= last]
    ticks = [row[1] for row in rows]
    # A new schedule starts with a tick after the first worker came up, not before.
    assert ticks[0] > up - timedelta(seconds=5), logs
    # One run per second, none missing, before and after the kill (ids are unique).
    assert ticks == [ticks[0] + timedelta(seconds=i) for i in range(len(ticks))], logs
    assert len(ticks) >= 10
    for _, tick, status, output in rows:
        assert status == Status.SUCCESS
        assert output == f'"{tick.isoformat()}"'
    # Each tick was stored by exactly one worker (the others found its id taken).
    stored = re.findall(r"Started tests\.every_second for its tick .* \(run (\S+)\)\.", logs)
    for pk, *_ in rows:
        assert stored.count(pk) == 1, (pk, logs)
