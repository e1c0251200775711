"""What every database backend offers, with the defaults that need nothing vendor-specific.

A backend is the one place that knows which database runs under an alias: the
querysets, the runtime, the writer and the notifications ask it, never the
connection's vendor. The defaults suit a database that locks rows as it goes and
has no statements of its own for the hot paths: the querysets then run their
portable ORM forms inside a transaction.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar, cast

from django.apps import apps
from django.db import connections

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from datetime import datetime

    from django.core.checks import CheckMessage
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor
    from django.db.models import Model


class Backend:
    vendor: ClassVar[str] = ""
    # How users and messages name the database.
    display_name: ClassVar[str] = ""
    # Claims, checkpoints, a workflow's end and the writer's batches have single
    # statements of their own (``claim``, ``checkpoint``, ``finish``, ``store_batch``).
    one_statement: ClassVar[bool] = False
    # An atomic step takes its fence last, so that the workflow's row stays unlocked
    # while the step runs (the heartbeat renews the lease, a cancel does not wait). A
    # database that locks the whole file instead takes the fence first.
    fence_after_atomic_step: ClassVar[bool] = True
    # Committed changes reach other processes' waiters through the database itself.
    notifies: ClassVar[bool] = False

    def __init__(self, using: str) -> None:
        self.using = using
        self._sql: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.using!r}>"

    @property
    def connection(self) -> BaseDatabaseWrapper:
        return connections[self.using]

    def quote(self, name: str) -> str:
        return self.connection.ops.quote_name(name)

    # Statements written by hand

    def names(self) -> dict[str, str]:
        """The quoted table names (``workflow``, ``step``, ``stream``, ``entry``,
        ``message``) and the column names that are keywords somewhere (``key``, ``length``,
        ``offset``, ``value``), for statement templates."""
        # The app registry, not an import: the models ask their backend for statements.
        tables = {
            name: self.quote(apps.get_model("durable_streams", model)._meta.db_table)
            for name, model in [
                ("workflow", "Workflow"),
                ("step", "Step"),
                ("stream", "Stream"),
                ("entry", "StreamEntry"),
                ("message", "Message"),
            ]
        }
        columns = {name: self.quote(name) for name in ("key", "length", "offset", "value")}
        return {**tables, **columns}

    def sql(self, template: str, **fields: str) -> str:
        """``template`` with its quoted table and column names (and ``fields``) filled in."""
        cache_key = (template, tuple(sorted(fields.items())))
        sql = self._sql.get(cache_key)
        if sql is None:
            sql = template.format(**self.names(), **fields)
            with self._lock:
                self._sql[cache_key] = sql
        return sql

    def fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of one of durable_streams' own statements."""
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def insert_unless_taken(self, row: Model) -> bool:
        """Insert ``row``; False, with nothing written, if its primary key is taken.

        One statement, inside a transaction too: a taken key must not break the
        caller's transaction, so no savepoint is needed.
        """
        connection = self.connection
        values = [
            field.get_db_prep_save(getattr(row, field.attname), connection)
            for field in row._meta.concrete_fields
        ]
        with connection.cursor() as cursor:
            cursor.execute(self.insert_sql(type(row), skip_taken=True), values)
            inserted: int = cursor.rowcount
        return inserted == 1

    def insert_sql(self, model: type[Model], *, skip_taken: bool) -> str:
        """An INSERT of every concrete field of ``model``; with ``skip_taken`` a row whose
        primary key is taken is skipped. Written once per model."""
        opts = model._meta
        cache_key = (f"insert {opts.label}", (("skip_taken", str(skip_taken)),))
        sql = self._sql.get(cache_key)
        if sql is None:
            fields = opts.concrete_fields
            columns = ", ".join(self.quote(cast(str, field.column)) for field in fields)
            sql = (
                f"INSERT INTO {self.quote(opts.db_table)} ({columns}) "
                f"VALUES ({', '.join(['%s'] * len(fields))})"
            )
            if skip_taken:
                sql += f" {self.skip_taken_clause(self.quote(cast(str, opts.pk.column)))}"
            with self._lock:
                self._sql[cache_key] = sql
        return sql

    def skip_taken_clause(self, pk_column: str) -> str:
        """What makes an INSERT skip a row whose primary key is taken."""
        return f"ON CONFLICT ({pk_column}) DO NOTHING"

    # The single statements of a backend with ``one_statement``

    def claim(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Claim rows: (id, name, inputs, attempts, previous status, previous owner, history?)."""
        raise NotImplementedError

    def held_target(self) -> str:
        """A ``finish()`` target: the run (workflow id, worker) if that worker holds it."""
        raise NotImplementedError

    def finish(
        self,
        target_sql: str,
        target_params: Sequence[Any],
        status: str,
        output: str | None,
        error: str | None,
        now: datetime,
    ) -> bool:
        """End the run that ``target_sql`` selects (as ``pk``) and close its open streams."""
        raise NotImplementedError

    def checkpoint(self, step: Any, worker_id: str, lease_until: datetime, *, flush: bool) -> bool:
        """Insert the step's row if the worker holds its workflow, renewing the lease."""
        raise NotImplementedError

    def store_batch(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The writer's batch: rows (held workflow id, None, None) and (workflow id, key,
        new stream id)."""
        raise NotImplementedError

    def max_statement_bytes(self) -> int | None:
        """Largest statement the server accepts, in bytes; None: no limit that matters here."""
        return None

    # Notifications across processes (where ``notifies``)

    def notification_connection(self) -> Any:
        """A new connection of its own for sending or receiving notifications (a context
        manager)."""
        raise NotImplementedError(f"{self.display_name} carries no notifications")

    def session_id(self, conn: Any) -> int:
        """The server's id of that connection's session, as notifications name their sender."""
        raise NotImplementedError

    def send_notifications(self, conn: Any, topics: list[str]) -> None:
        raise NotImplementedError

    def listen(self, conn: Any) -> None:
        raise NotImplementedError

    def notifications(self, conn: Any, timeout: float) -> Iterator[tuple[int, str]]:
        """(sending session, topic) of what arrives within ``timeout`` seconds."""
        raise NotImplementedError

    # Schema

    def add_unique_where_not_null(
        self,
        schema_editor: BaseDatabaseSchemaEditor,
        model: type[Model],
        fields: list[str],
        name: str,
    ) -> None:
        """Make ``fields`` unique among the rows where they are all set, where the model's
        conditional unique constraint could not (a migration calls this)."""

    def remove_unique_where_not_null(
        self, schema_editor: BaseDatabaseSchemaEditor, model: type[Model], name: str
    ) -> None:
        """Undo ``add_unique_where_not_null()``."""

    # Transactions and connections

    def explain(self, exc: Exception) -> str | None:
        """What an operator should know about ``exc``, where this database has a known
        cause for it (said instead of a traceback); None otherwise."""
        return None

    def take_write_lock(self) -> None:
        """Start the current transaction as a writer (databases that lock rows need nothing)."""

    @classmethod
    def connection_created(cls, connection: BaseDatabaseWrapper) -> None:
        """Set up a new connection of this vendor (any alias)."""

    # System checks

    @classmethod
    def check_installed(cls, using: str, settings_dict: dict[str, Any]) -> list[CheckMessage]:
        """What is missing for database ``using`` (its settings), found without connecting."""
        return []

    def check_server(self) -> list[CheckMessage]:
        """What the server lacks (its version, its settings); connects."""
        return []
