"""Workflows that wait (tests/test_waiting.py)."""

from __future__ import annotations

import time

from durable_streams import (
    sleep,
    step,
    workflow,
    write_stream,
)


@step
def clock() -> float:
    return time.time()


@workflow
def napper(seconds: float) -> float:
    """Writes, sleeps ``seconds``, and returns how long after its first start it woke."""
    started = clock()
    write_stream("out", "asleep")
    sleep(seconds)
    return time.time() - started
