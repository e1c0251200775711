"""Workflows of the database-fault tests (test_faults, test_fault_processes)."""

from __future__ import annotations

import time
from typing import Any

from django.db import OperationalError

from durable_streams import close_stream, step, workflow, write_stream

from .workflows import echo, wait_for_effect, worker_effect


@step
def held_step(label: str) -> str:
    """Tell the test it runs, wait until the test holds the workflow's row, then return."""
    worker_effect(f"{label}-started")
    wait_for_effect(f"{label}-locked")
    worker_effect(f"{label}-returned")
    return f"{label}-first"


@step
def second_step(label: str) -> str:
    worker_effect(f"{label}-second")
    return f"{label}-second"


@workflow
def two_steps(label: str) -> list[str]:
    return [held_step(label), second_step(label)]


@step(atomic=True)
def atomic_effect(label: str) -> str:
    worker_effect(label)
    write_stream("out", label)
    return label


@workflow
def atomic_then_step(label: str) -> list[str]:
    return [atomic_effect(label), second_step(label)]


@step(retries=1, backoff=0)
def database_error_in_step(label: str, failures: int) -> str:
    """The step's own code meets a database error ``failures`` times: the step's failure."""
    worker_effect(label)
    from .models import Effect

    if Effect.objects.filter(label=label).count() <= failures:
        raise OperationalError("the step's own query failed")
    return label


@workflow
def own_database_error(label: str, failures: int) -> str:
    return database_error_in_step(label, failures)


@workflow
def starts_a_child(label: str) -> Any:
    child = echo.start(label)
    return [child.workflow_id, second_step(label)]


@workflow
def streaming(label: str, count: int, delay: float) -> int:
    """Stream ``count`` values with a step between each: a long run with many checkpoints."""
    for i in range(count):
        write_stream("out", [label, i])
        pause(delay)
    close_stream("out")
    return count


@step
def pause(seconds: float) -> None:
    time.sleep(seconds)
