"""Wake-ups for waiting readers, result waiters and idle workers.

A *doorbell*, never a data channel: a waiter that is woken re-reads the database,
and every wait is bounded, so a lost notification costs latency, never a value.

Within one process, a commit rings the bell through ``transaction.on_commit``.
Across processes on PostgreSQL, the same commit sends ``NOTIFY`` and one listener
thread per process rings the bell for its local waiters. Elsewhere (SQLite across
processes) waiters poll every ``POLL_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from django.db import connections, transaction

from .conf import get_config

logger = logging.getLogger("durable_streams.notify")

PG_CHANNEL = "durable_streams"


def workflow_topic(workflow_id: str) -> str:
    return json.dumps(["w", workflow_id])


def stream_topic(workflow_id: str, key: str) -> str:
    return json.dumps(["s", workflow_id, key])


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
            await asyncio.wait_for(self._async_event.wait(), timeout)
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


def uses_listen_notify(using: str) -> bool:
    return connections[using].vendor == "postgresql" and get_config().LISTEN_NOTIFY


def announce(topics: Iterable[str], using: str) -> None:
    """Ring ``topics`` once the current transaction commits (in every process)."""
    topics = list(dict.fromkeys(topics))
    if not topics:
        return
    if uses_listen_notify(using):
        with connections[using].cursor() as cursor:
            for topic in topics:
                cursor.execute("SELECT pg_notify(%s, %s)", [PG_CHANNEL, topic])
    ring_after_commit(topics, using)


def ring_after_commit(topics: list[str], using: str) -> None:
    """Ring ``topics`` in this process once the current transaction commits.

    For callers that sent their ``NOTIFY`` themselves, in a statement of their own.
    """

    def ring_locally() -> None:
        for topic in topics:
            hub.ring(topic)

    transaction.on_commit(ring_locally, using=using)


class _Listener(threading.Thread):
    """One thread per process holding a dedicated LISTEN connection."""

    def __init__(self, using: str) -> None:
        super().__init__(name=f"durable-streams-listener-{using}", daemon=True)
        self.using = using
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.connected = False

    def run(self) -> None:
        import psycopg

        backoff = 0.1
        while not self.stopping.is_set():
            try:
                params = connections[self.using].get_connection_params()
                params.pop("cursor_factory", None)
                params.pop("context", None)
                with psycopg.connect(**params, autocommit=True) as conn:
                    conn.execute(f"LISTEN {PG_CHANNEL}")
                    self.connected = True
                    self.ready.set()
                    backoff = 0.1
                    while not self.stopping.is_set():
                        for notification in conn.notifies(timeout=0.5):
                            hub.ring(notification.payload)
            except Exception:
                logger.warning(
                    "LISTEN connection to database %r failed; readers poll until it is back.",
                    self.using,
                    exc_info=True,
                )
            self.connected = False
            self.ready.set()
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 5.0)


_listeners: dict[str, _Listener] = {}
_listeners_lock = threading.Lock()


def ensure_listener(using: str) -> bool:
    """Start this process's listener for ``using`` if it can have one; True if it is live."""
    if not uses_listen_notify(using):
        return False
    with _listeners_lock:
        listener = _listeners.get(using)
        if listener is None:
            listener = _listeners[using] = _Listener(using)
            listener.start()
    listener.ready.wait(5.0)
    return listener.connected


def stop_listeners() -> None:
    """Close this process's LISTEN connections (before dropping a test database, say)."""
    with _listeners_lock:
        listeners = list(_listeners.values())
        _listeners.clear()
    for listener in listeners:
        listener.stopping.set()
    for listener in listeners:
        listener.join(timeout=5)


def poll_interval(using: str) -> float:
    """How long a waiter may sleep before it must look at the database again."""
    config = get_config()
    if ensure_listener(using):
        return config.NOTIFY_FALLBACK_POLL
    return config.POLL_INTERVAL


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
