"""Workflows that write streams for the reader tests (WebSocket, SSE, fan-out, flow control).

A gate is an Effect row the test creates (``tests.sockets.open_gate``): the workflow
waits for it, so that a test can connect its readers before the values come.
"""

from __future__ import annotations

import time
from typing import Any

from durable_streams import close_stream, step, workflow, write_stream
from tests.workflows import wait_for_effect


@step
def wait_for_gate(label: str, timeout: float) -> bool:
    return wait_for_effect(label, timeout)


@workflow(name="tests.consumers.gated")
def gated(key: str, before: list[Any], after: list[Any], gate: str) -> int:
    for value in before:
        write_stream(key, value)
    wait_for_gate(gate, 20.0)
    for value in after:
        write_stream(key, value)
    close_stream(key)
    return len(before) + len(after)


@step
def pause(seconds: float) -> None:
    time.sleep(seconds)


@workflow(name="tests.consumers.paced")
def paced(key: str, values: list[Any], gate: str, delay: float) -> None:
    """One commit per value: a step between writes makes the writer store each at once."""
    wait_for_gate(gate, 20.0)
    for value in values:
        write_stream(key, value)
        pause(delay)
    close_stream(key)


@workflow(name="tests.consumers.many")
def many(key: str, count: int) -> int:
    for i in range(count):
        write_stream(key, {"i": i, "text": f"value {i}"})
    close_stream(key)
    return count


@workflow(name="tests.consumers.keys")
def keys(names: list[str], count: int, gate: str) -> None:
    wait_for_gate(gate, 20.0)
    for i in range(count):
        for name in names:
            write_stream(name, f"{name}:{i}")
    # No close_stream: the end of the workflow closes them.


VALUE_CHARS = 1000


def value(i: int) -> str:
    return f"{i:06d}" + "x" * (VALUE_CHARS - 6)


@workflow(name="tests.flow.sized")
def sized(key: str, count: int) -> int:
    for i in range(count):
        write_stream(key, value(i))
    close_stream(key)
    return count
