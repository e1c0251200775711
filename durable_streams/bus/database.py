"""Notifications across processes through the database (PostgreSQL's LISTEN/NOTIFY).

The notifications leave after the commit, not inside it (see the backend for why),
from one notifier thread per process and database, on a connection that writes
nothing else: it sends whatever gathered while its previous batch was on the way,
in one statement. One listener thread per process holds a LISTEN connection and
rings the local waiters (``local.hub``) of what other processes committed.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from ..backends import backend_for
from ..conf import get_config
from .local import hub

if TYPE_CHECKING:
    pass

logger = logging.getLogger("durable_streams.bus")


def uses_listen_notify(using: str) -> bool:
    return backend_for(using).notifies and get_config().LISTEN_NOTIFY


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
                                hub.ring(topic, remote=True)
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


def listener_started(using: str) -> bool:
    """Whether this process already runs its listener for ``using`` (never blocks)."""
    with _listeners_lock:
        return using in _listeners


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
