"""Bounded waiting on a condition: the one way these tests wait for something to happen."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from asgiref.sync import sync_to_async

T = TypeVar("T")


def _give_up(timeout: float, what: str, condition: object, last: object) -> AssertionError:
    return AssertionError(f"Waited {timeout}s in vain for {what or condition!r} (last: {last!r}).")


def poll(condition: Callable[[], T], *, timeout: float, interval: float = 0.02) -> T:
    """Call ``condition`` until it returns something truthy, for ``timeout`` seconds at most;
    return its last value (falsy after the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(
    condition: Callable[[], T], *, timeout: float, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Fails after ``timeout`` seconds with ``what`` (what was awaited) in the message.
    """
    value = poll(condition, timeout=timeout, interval=interval)
    if not value:
        raise _give_up(timeout, what, condition, value)
    return value


async def wait_until_async(
    condition: Callable[[], T] | Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """``wait_until`` for async tests, without blocking the event loop.

    A coroutine function is awaited; a plain callable runs in a thread
    (``sync_to_async``), so it may query the database.
    """
    check = condition if inspect.iscoroutinefunction(condition) else sync_to_async(condition)
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise _give_up(timeout, what, condition, value)
        await asyncio.sleep(interval)
