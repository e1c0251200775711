"""SQLite: one writer at a time, for development and single-machine deployments."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.apps import apps

from .base import Backend

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class SQLiteBackend(Backend):
    vendor = "sqlite"
    display_name = "SQLite"
    # The write lock covers the whole file: an atomic step takes it up front, before
    # it reads, so it never has to upgrade a read lock (which fails at once).
    fence_after_atomic_step = False

    def take_write_lock(self) -> None:
        """SQLite opens transactions as readers; a reader that later writes fails at once
        with "database is locked" when another connection wrote in between. A no-op
        UPDATE takes the write lock up front, so the busy timeout applies instead.
        """
        connection = self.connection
        if connection.in_atomic_block:
            table = self.quote(apps.get_model("durable_streams", "Workflow")._meta.db_table)
            with connection.cursor() as cursor:
                cursor.execute(f'UPDATE {table} SET "id" = "id" WHERE 0 = 1')

    def explain(self, exc: Exception) -> str | None:
        if "database is locked" not in str(exc):
            return None
        options = self.connection.settings_dict.get("OPTIONS", {})
        timeout = options.get("timeout", 20)
        return (
            f"The SQLite database {self.connection.settings_dict['NAME']!s} stayed locked for "
            f"its busy timeout ({timeout} s): another connection held its write lock all that "
            "time. SQLite lets one connection write at a time; look for a long transaction "
            "(a step or a command inside transaction.atomic()) or another program writing to "
            "the file (a sqlite3 shell, a database browser). For many writers, use PostgreSQL "
            "or MariaDB."
        )

    @classmethod
    def connection_created(cls, connection: BaseDatabaseWrapper) -> None:
        """Let the worker and the web server share one SQLite file."""
        with connection.cursor() as cursor:
            # WAL: readers never block the writer, nor the writer the readers.
            cursor.execute("PRAGMA journal_mode=WAL")
            if "timeout" not in connection.settings_dict.get("OPTIONS", {}):
                # Wait for the write lock rather than fail at once.
                cursor.execute("PRAGMA busy_timeout = 20000")
