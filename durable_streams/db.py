"""Small database helpers shared by the runtime, the worker and the readers."""

from __future__ import annotations

import time
from typing import Any

from django.db import connections
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from .conf import get_config


def alias() -> str:
    return get_config().DATABASE


def take_write_lock(using: str) -> None:
    """Start the current transaction as a writer.

    SQLite opens transactions as readers; a reader that later writes fails at once
    with "database is locked" when another connection wrote in between. A no-op
    UPDATE takes the write lock up front, so the busy timeout applies instead.
    Other databases lock rows as they go and need nothing.
    """
    connection = connections[using]
    if connection.vendor == "sqlite" and connection.in_atomic_block:
        from .models import Workflow

        with connection.cursor() as cursor:
            cursor.execute(f'UPDATE "{Workflow._meta.db_table}" SET "id" = "id" WHERE 0 = 1')


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


def run_statement(using: str, sql: str, params: Any) -> tuple[list[tuple[Any, ...]], int]:
    """Run one of durable_streams' own PostgreSQL statements; return its rows and row count.

    These few statements (the writer's batch, checkpoints, claims, a workflow's end)
    are long and run on every step: PostgreSQL spends more time planning them than
    running them. They bind their parameters on the server, and with
    ``PREPARED_STATEMENTS`` (the default) psycopg prepares each once per connection.
    Django's own queries bind in the client and are never prepared, and the
    connection's ``prepare_threshold`` is left as it was for them.
    """
    import psycopg

    wrapper = connections[using]
    wrapper.ensure_connection()
    connection = wrapper.connection
    threshold = connection.prepare_threshold
    # 0: prepare at the first run; None: never.
    connection.prepare_threshold = 0 if get_config().PREPARED_STATEMENTS else None
    try:
        raw = psycopg.Cursor(connection)
        # Django's wrapper: its error classes, execute_wrapper() hooks and query logging.
        # (make_cursor() takes the driver's cursor; django-stubs say Django's wrapper.)
        cursor = (
            _LoggedStatement(raw, wrapper) if wrapper.queries_logged else wrapper.make_cursor(raw)  # type: ignore[arg-type]
        )
        with cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall() if cursor.description is not None else []
            return rows, cursor.rowcount
    finally:
        connection.prepare_threshold = threshold


class _LoggedStatement(CursorDebugWrapper):
    """Logs the statement with its parameters in (``connection.queries``, the
    ``django.db.backends`` logger), as Django does for its own queries.

    Django reads the logged SQL back from a cursor that binds in the client; these
    bind on the server, so the text is composed here, for the log only.
    """

    # Narrower than Django's (SQL text or composed SQL): these statements are text.
    def execute(self, sql: str, params: Any = None) -> Any:  # type: ignore[override]
        with self.debug_sql(_composed(self.cursor, sql, params), params):
            return CursorWrapper.execute(self, sql, params)


def _composed(cursor: Any, sql: str, params: Any) -> str:
    import psycopg

    try:
        return psycopg.ClientCursor(cursor.connection).mogrify(sql, params)
    except Exception:
        return sql
