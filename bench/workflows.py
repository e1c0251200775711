"""The durable_streams workflows the benchmarks run (found by workflow autodiscovery).

Each has a twin in ``dbos_app.py`` that does the same work through DBOS. The wall
clock is read in workflow bodies on purpose: these measure, they are not replayed
for their timing.
"""

from __future__ import annotations

import os
import time
from typing import Any

from durable_streams import close_stream, step, workflow, write_stream

QUEUE = "bench"


@workflow(name="bench.noop", queue=QUEUE)
def noop() -> str:
    return "ok"


@workflow(name="bench.append", queue=QUEUE)
def append(count: int) -> float:
    """Item 1: ``count`` small JSON values to one stream, then close it."""
    started = time.time()
    write_stream("out", {"i": 0, "t": started})
    for i in range(1, count):
        write_stream("out", {"i": i})
    close_stream("out")
    return started


@step(name="bench.wait_for_file")
def wait_for_file(path: str, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.005)
    return False


@workflow(name="bench.ticker", queue=QUEUE)
def ticker(count: int, interval: float, go_path: str) -> int:
    """Item 2: a value carrying its wall-clock time every ``interval`` seconds.

    The first value tells the reader the writer is up; timing starts once the
    reader has answered by creating ``go_path``.
    """
    write_stream("t", {"i": -1})
    if not wait_for_file(go_path, 60.0):
        raise RuntimeError(f"the reader never created {go_path}")
    due = time.monotonic()
    for i in range(count):
        write_stream("t", {"i": i, "t": time.time()})
        due += interval
        time.sleep(max(due - time.monotonic(), 0.0))
    close_stream("t")
    return count


@step(name="bench.emit")
def emit(j: int) -> int:
    write_stream("out", j)
    return j


@workflow(name="bench.three_steps", queue=QUEUE)
def three_steps(i: int) -> int:
    """Item 5: three steps, each writing one stream value."""
    for j in range(3):
        emit(j)
    return i


@step(name="bench.square")
def square(i: int) -> int:
    return i * i


@workflow(name="bench.many_steps", queue=QUEUE)
def many_steps(count: int) -> dict[str, Any]:
    """Steps per second in one workflow."""
    started = time.time()
    for i in range(count):
        square(i)
    return {"count": count, "seconds": time.time() - started}


@step(name="bench.nap")
def nap(seconds: float) -> None:
    time.sleep(seconds)


@workflow(name="bench.slow_writer", queue=QUEUE)
def slow_writer(count: int, delay: float) -> int:
    """Item 6: a step, then a value written by the body, ``count`` times."""
    for i in range(count):
        nap(delay)
        write_stream("out", i)
    close_stream("out")
    return count


@workflow(name="bench.fill", queue=QUEUE)
def fill(count: int) -> int:
    """Item 7: the closed stream that catch-up reads."""
    for i in range(count):
        write_stream("out", {"i": i})
    close_stream("out")
    return count


@workflow(name="bench.fill_sized", queue=QUEUE)
def fill_sized(count: int, chars: int) -> int:
    """Item 9: the closed stream of values of about ``chars`` characters that nobody reads."""
    pad = "x" * chars
    for i in range(count):
        write_stream("out", {"i": i, "pad": pad})
    close_stream("out")
    return count
