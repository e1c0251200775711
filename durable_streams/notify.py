"""Wake-ups for waiting readers, result waiters and idle workers.

A *doorbell*, never a data channel: a waiter that is woken re-reads the database,
and every wait is bounded, so a lost notification costs latency, never a value.

Within one process, a commit rings the bell through ``transaction.on_commit``.
Across processes, on a database whose backend carries notifications
(``Backend.notifies``), the commit hands its topics to the process's notifier
thread, which sends them on a connection of its own, and one listener thread per
process rings the bell for its local waiters. Elsewhere waiters in other processes
poll every ``POLL_INTERVAL`` seconds.

The notifications leave after the commit, not inside it (see the backend for why),
from the notifier's own connection, which writes nothing else: it sends whatever
gathered while its previous batch was on the way, in one statement.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import delivery
from .backends import backend_for
from .conf import get_config

if TYPE_CHECKING:
    from .models import Changes

logger = logging.getLogger("durable_streams.notify")


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


def uses_listen_notify(using: str) -> bool:
    return backend_for(using).notifies and get_config().LISTEN_NOTIFY


def announce(topics: Iterable[str], using: str) -> None:
    """Ring ``topics`` in every process once the current transaction commits.

    Outside a transaction, at once.
    """
    topics = list(dict.fromkeys(topics))
    if not topics:
        return
    send = uses_listen_notify(using)

    def ring() -> None:
        for topic in topics:
            hub.ring(topic)
        if send:
            notifier(using).send(topics)

    transaction.on_commit(ring, using=using)


def publish_changes(changes: Changes, using: str) -> None:
    """Tell every waiter what a queryset method changed, once the current transaction commits.

    Outside a transaction, at once. Idle workers hear of the queues with new work;
    result waiters, Python readers and live feeds hear of the workflows that ended or
    were resumed. Whoever asks a queryset for a change calls this with its result.
    """
    announce(
        [queue_topic(queue) for queue in changes.queues]
        + [workflow_topic(workflow_id) for workflow_id, _ in changes.ended],
        using,
    )
    for workflow_id, status in changes.ended:
        transaction.on_commit(partial(delivery.workflow_ended, workflow_id, status), using=using)
    if changes.resumed:
        resumed = list(changes.resumed)
        transaction.on_commit(partial(delivery.workflows_resumed, resumed), using=using)


class _Notifier:
    """Sends this process's notifications for one database from a thread of its own."""

    def __init__(self, using: str) -> None:
        self.using = using
        self._backend = backend_for(using)
        self._cond = threading.Condition()
        self._pending: dict[str, None] = {}
        self._sending = False
        self._stopping = False
        self._failures = 0
        self._thread = threading.Thread(
            target=self._run, name=f"durable-streams-notifier-{using}", daemon=True
        )
        self._thread.start()

    def send(self, topics: list[str]) -> None:
        with self._cond:
            self._pending.update(dict.fromkeys(topics))
            self._cond.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait (bounded) until what was handed over is sent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._sending) and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is pending, then close the connection."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _send_until_stopped(self, conn: Any) -> None:
        while True:
            with self._cond:
                self._sending = False
                self._cond.notify_all()
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                topics, self._pending = list(self._pending), {}
                self._sending = True
            self._backend.send_notifications(conn, topics)
            self._failures = 0

    def _run(self) -> None:
        while not self._stopping:
            try:
                with self._backend.notification_connection() as conn:
                    pid = self._backend.session_id(conn)
                    _sender_pids[self.using].add(pid)
                    try:
                        self._send_until_stopped(conn)
                        return
                    finally:
                        # The server may give the number to another client's session.
                        _sender_pids[self.using].discard(pid)
            except Exception:
                # What was in flight is lost: its waiters find the values when they poll.
                self._failures += 1
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    logger.warning(
                        "Could not send notifications on database %r (%d times in a row); "
                        "readers in other processes poll until it is back.",
                        self.using,
                        self._failures,
                        exc_info=True,
                    )
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()
                time.sleep(min(0.1 * 2 ** min(self._failures, 6), 5.0))


_notifiers: dict[str, _Notifier] = {}
# The server processes of this process's notifier connections, by database.
_sender_pids: defaultdict[str, set[int]] = defaultdict(set)
_notifiers_lock = threading.Lock()
_notifiers_pid = os.getpid()


def notifier(using: str) -> _Notifier:
    global _notifiers_pid
    with _notifiers_lock:
        if _notifiers_pid != os.getpid():
            # A forked child has none of its parent's threads.
            _notifiers.clear()
            _notifiers_pid = os.getpid()
        instance = _notifiers.get(using)
        if instance is None:
            instance = _notifiers[using] = _Notifier(using)
        return instance


def flush_notifications(timeout: float = 2.0) -> None:
    """Send what this process still has to announce (a stopping worker, at exit)."""
    with _notifiers_lock:
        instances = list(_notifiers.values()) if _notifiers_pid == os.getpid() else []
    for instance in instances:
        instance.flush(timeout)


atexit.register(flush_notifications)


class _Listener(threading.Thread):
    """One thread per process holding a dedicated LISTEN connection."""

    def __init__(self, using: str) -> None:
        super().__init__(name=f"durable-streams-listener-{using}", daemon=True)
        self.using = using
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.connected = False

    def run(self) -> None:
        backend = backend_for(self.using)
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                with backend.notification_connection() as conn:
                    backend.listen(conn)
                    self.connected = True
                    self.ready.set()
                    backoff = 0.1
                    while not self.stopping.is_set():
                        for pid, topic in backend.notifications(conn, 0.5):
                            # This process rang its own waiters when it committed.
                            if pid not in _sender_pids[self.using]:
                                hub.ring(topic)
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
    """Close this process's LISTEN and NOTIFY connections (before dropping a test database)."""
    with _notifiers_lock:
        notifiers = list(_notifiers.values())
        _notifiers.clear()
    for instance in notifiers:
        instance.stop()
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
