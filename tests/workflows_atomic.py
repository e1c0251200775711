"""Workflows whose atomic steps write to streams (imported by tests/workflows.py)."""

from __future__ import annotations

import threading

from durable_streams import step, workflow, write_stream

from .models import Effect

# Attempts per label, kept in memory: the step's own rows roll back on failure.
_attempts: dict[str, int] = {}


@step(atomic=True, retries=1, backoff=0)
def atomic_writer(label: str, fail_first: bool) -> int:
    _attempts[label] = _attempts.get(label, 0) + 1
    write_stream("atomic", f"{label}-a")
    write_stream("atomic", f"{label}-b")
    Effect.objects.create(workflow_id="", label=label)
    if fail_first and _attempts[label] == 1:
        raise ConnectionError("first attempt fails after two writes")
    return Effect.objects.filter(label=label).count()


@workflow
def atomic_stream_writer(label: str, fail_first: bool) -> int:
    write_stream("atomic", "before")
    count = atomic_writer(label, fail_first)
    write_stream("atomic", "after")
    return count


def attempts(label: str) -> int:
    return _attempts.get(label, 0)


# For a worker thread in the test's process: the step waits, inside its transaction,
# until the test lets it end.
step_running = threading.Event()
step_may_end = threading.Event()


@step(atomic=True)
def atomic_waiting(label: str) -> str:
    Effect.objects.create(workflow_id="", label=label)
    step_running.set()
    if not step_may_end.wait(30):
        raise TimeoutError("the test never let the step end")
    return label


@workflow
def waits_in_an_atomic_step(label: str) -> str:
    return atomic_waiting(label)
