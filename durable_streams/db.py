"""Small database helpers shared by the runtime, the worker and the readers."""

from __future__ import annotations

import time

from django.db import connections

from .backends import backend_for
from .conf import get_config


def alias() -> str:
    return get_config().DATABASE


def take_write_lock(using: str) -> None:
    """Start the current transaction as a writer.

    A database that locks the whole file takes its write lock up front, so
    that its busy timeout applies rather than an error when another connection wrote
    in between; databases that lock rows as they go need nothing.
    """
    backend_for(using).take_write_lock()


class ConnectionKeeper:
    """Keeps a long-lived thread's connection open, and replaces it when it broke.

    ``close_old_connections()`` would close it after every use under the default
    ``CONN_MAX_AGE = 0``, costing a new connection per batch in a busy loop.
    """

    def __init__(self, using: str, idle_check_seconds: float = 30.0) -> None:
        self.using = using
        self.idle_check_seconds = idle_check_seconds
        self._last_used = time.monotonic()

    def ready(self) -> None:
        """Call before using the connection."""
        connection = connections[self.using]
        idle = time.monotonic() - self._last_used
        if connection.connection is not None and (
            connection.errors_occurred or idle > self.idle_check_seconds
        ):
            if not connection.is_usable():
                connection.close()
            connection.errors_occurred = False
        self._last_used = time.monotonic()

    def broken(self) -> None:
        """Call after a database error: the next use starts a new connection."""
        connections[self.using].close()
