"""The waiters of this process: threads and event loops, by topic.

A topic names what changed: a workflow (it ended, was resumed), a stream (values or
a close) or a queue (new work). Subscribe *before* reading the database, so that a
commit landing between the read and the wait still rings the waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

logger = logging.getLogger("durable_streams.bus")


def workflow_topic(workflow_id: str) -> str:
    return json.dumps(["w", workflow_id])


def stream_topic(workflow_id: str, key: str) -> str:
    return json.dumps(["s", workflow_id, key])


def message_topic(workflow_id: str) -> str:
    """Rung when a message to the workflow is stored (on any topic of its own)."""
    return json.dumps(["m", workflow_id])


def event_topic(workflow_id: str) -> str:
    """Rung when the workflow sets an event (any key)."""
    return json.dumps(["e", workflow_id])


def queue_topic(queue: str) -> str:
    return json.dumps(["q", queue])


class Waiter:
    """A resettable event that a sync thread or an asyncio task can wait on."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._event = threading.Event()
        self._async_event = asyncio.Event() if loop is not None else None

    def ring(self) -> None:
        if self._loop is not None:
            assert self._async_event is not None
            # A closed loop raises RuntimeError: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._async_event.set)
        else:
            self._event.set()

    def clear(self) -> None:
        if self._async_event is not None:
            self._async_event.clear()
        else:
            self._event.clear()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    async def async_wait(self, timeout: float) -> bool:
        assert self._async_event is not None
        try:
            async with asyncio.timeout(timeout):
                await self._async_event.wait()
        except TimeoutError:
            return False
        return True


class Hub:
    """Maps topics to the local waiters that want to hear about them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}

    def add(self, topics: Iterable[str], waiter: Waiter) -> None:
        with self._lock:
            for topic in topics:
                self._waiters.setdefault(topic, set()).add(waiter)

    def remove(self, topics: Iterable[str], waiter: Waiter) -> None:
        with self._lock:
            for topic in topics:
                waiters = self._waiters.get(topic)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[topic]

    def ring(self, topic: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(topic, ()))
        for waiter in waiters:
            waiter.ring()

    def watched(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._waiters.values())


hub = Hub()


@contextmanager
def subscribe(
    topics: Iterable[str], *, loop: asyncio.AbstractEventLoop | None = None
) -> Iterator[Waiter]:
    """Register a waiter on ``topics`` for the duration of the block.

    Subscribe *before* reading the database, so that a commit landing between the
    read and the wait still rings the waiter.
    """
    topics = list(topics)
    waiter = Waiter(loop)
    hub.add(topics, waiter)
    try:
        yield waiter
    finally:
        hub.remove(topics, waiter)


def watched_topics() -> int:
    return hub.watched()
