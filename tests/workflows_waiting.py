"""Workflows that sleep, receive messages and publish events (tests/test_waiting.py)."""

from __future__ import annotations

import time
from typing import Any

from durable_streams import (
    MessageTimeout,
    recv,
    send,
    set_event,
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


@workflow
def collector(count: int, topic: str | None = None) -> int:
    write_stream("out", "ready")
    for _ in range(count):
        write_stream("got", recv(topic))
    return count


@workflow
def impatient(timeout: float) -> str:
    write_stream("out", "waiting")
    try:
        recv("never", timeout=timeout)
    except MessageTimeout:
        write_stream("out", "timed out")
    # A second run replays the timeout without waiting again.
    sleep(0)
    return str(recv("go"))


@workflow
def publisher(count: int) -> int:
    for i in range(count):
        set_event("progress", i)
        recv("next")
    set_event("progress", "done")
    return count


@workflow
def forwarder(target: str, values: list[Any]) -> None:
    for value in values:
        send(target, value, "fwd")
    # A crash here replays the sends: none is stored twice.
    write_stream("out", "sent")
    recv("end")


# Set by a test to change the body between two runs.
swapped = {"on": False}


@workflow
def swapper() -> None:
    write_stream("out", "start")
    if swapped["on"]:
        recv(timeout=0)
    else:
        sleep(0)
    recv("go")


@workflow
def first_recv(timeout: float) -> str:
    """A recv as its first operation: nothing recorded before it."""
    try:
        return str(recv("go", timeout=timeout))
    except MessageTimeout:
        return "timed out"
