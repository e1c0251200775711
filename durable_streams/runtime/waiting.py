"""What a workflow waits for: durable sleep.

Each wait function that has an effect takes the body's next operation number and
records it as a checkpoint (under a step name of ``WAIT_KINDS``): a sleep's wake time.
A replay finds it and waits only for what is left.

In this version a waiting run blocks in place: it keeps its worker slot, and its
lease, which the worker's heartbeat renews. It waits on the wake-up path (the bus)
with a bounded wait, and wakes at once when it is cancelled or its worker stops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

from django.utils import timezone

from .. import encoding
from ..bus import poll_interval, subscribe, workflow_topic
from ..models import Step, Workflow
from .execution import (
    Execution,
    current_execution,
    library_statements,
    record_checkpoint,
)

T = TypeVar("T")

SLEEP = "durable_streams.sleep"


# Checking arguments


def check_seconds(seconds: object, what: str = "seconds") -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(seconds).__name__}.")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"{what} must be a finite number of seconds of at least 0, not {seconds!r}."
        )
    return float(seconds)


def _recorded_step(execution: Execution, operation: int, what: str) -> Step:
    with library_statements(execution, f"reading the record of {what}"):
        return Step.objects.using(execution.using).get(
            workflow_id=execution.workflow_id, operation=operation
        )


def _wait_in_place(
    execution: Execution,
    topics: list[str],
    attempt: Callable[[], T | None],
    until: float | None,
    what: str,
) -> T | None:
    """Call ``attempt`` until it returns something, or until the wall-clock time ``until``.

    Woken by ``topics``, by a change of the workflow (a cancel) and by a stop of the
    run; between two wake-ups at most the poll interval passes. A cancel or a lost
    lease ends the run here at once.
    """
    using = execution.using
    with (
        subscribe([*topics, workflow_topic(execution.workflow_id)]) as waiter,
        execution.stop.watched_by(waiter.ring),
    ):
        interval = poll_interval(using)
        while True:
            waiter.clear()
            execution.check_stop()
            with library_statements(execution, what):
                held = (
                    Workflow.objects.using(using)
                    .held_by(execution.worker_id)
                    .filter(pk=execution.workflow_id)
                    .exists()
                )
                if not held:
                    execution.lease_lost()
                result = attempt()
            if result is not None:
                return result
            wait = interval
            if until is not None:
                left = until - time.time()
                if left <= 0:
                    return None
                wait = min(wait, left)
            waiter.wait(wait)


# Sleep


def sleep(seconds: float) -> None:
    """Sleep ``seconds``; in a workflow body a durable timer.

    The body's wake time is recorded: a replay after a crash or a restart waits only
    for what is left of it. Outside a workflow, and in a step, a plain sleep.
    """
    seconds = check_seconds(seconds)
    execution = current_execution()
    if execution is None or execution.step_name is not None:
        time.sleep(seconds)
        return
    execution.check_stop()
    operation, replaying = execution.take_operation("sleep", "")
    if replaying:
        step = _recorded_step(execution, operation, "sleep()")
        wake_at = float(encoding.loads(step.output or "{}")["wake_at"])
    else:
        wake_at = time.time() + seconds
        record_checkpoint(
            execution,
            operation,
            SLEEP,
            Step.Outcome.SUCCESS,
            encoding.dumps({"wake_at": wake_at, "seconds": seconds}),
            None,
            1,
            timezone.now(),
        )
    _wait_in_place(execution, [], lambda: None, wake_at, "sleeping")
