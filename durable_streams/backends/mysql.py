"""MySQL 8+ and MariaDB 10.6+ (mysqlclient): row locks with SKIP LOCKED, the ORM's statements.

Claims, checkpoints, a workflow's end and the writer's batches run as the portable
ORM forms in a transaction (MySQL has no UPDATE ... RETURNING, nor statements that
chain writes). Django opens MySQL connections in READ COMMITTED, the level these
transactions are written and tested for; the connection charset is utf8mb4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from django.core.checks import Error, Warning
from django.db import IntegrityError

from .base import Backend

if TYPE_CHECKING:
    from django.core.checks import CheckMessage
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor
    from django.db.models import Field, Model

# ER_DUP_ENTRY: a unique key is taken.
_DUPLICATE_KEY = 1062
# SELECT ... FOR UPDATE SKIP LOCKED, which claims and lease renewals use.
MINIMUM_MARIADB = (10, 6)
MINIMUM_MYSQL = (8, 0, 1)


class MySQLBackend(Backend):
    vendor = "mysql"
    display_name = "MySQL/MariaDB"
    _max_packet: int | None = None

    def insert_unless_taken(self, row: Model) -> bool:
        # A failed statement rolls back only itself, never the caller's transaction,
        # so the plain INSERT serves inside one too. (INSERT IGNORE would also turn
        # other errors, a missing foreign key among them, into warnings.)
        connection = self.connection
        values = [
            field.get_db_prep_save(getattr(row, field.attname), connection)
            for field in row._meta.concrete_fields
        ]
        sql = self.insert_sql(type(row), skip_taken=False)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, values)
        except IntegrityError as exc:
            if exc.args and exc.args[0] == _DUPLICATE_KEY and "PRIMARY" in str(exc):
                return False
            raise
        return True

    def add_unique_where_not_null(
        self,
        schema_editor: BaseDatabaseSchemaEditor,
        model: type[Model],
        fields: list[str],
        name: str,
    ) -> None:
        # No conditional unique indexes here (Django leaves such a constraint out), but
        # a plain unique index never compares NULLs: it allows the same rows.
        columns = ", ".join(
            self.quote(cast(str, cast("Field[Any, Any]", model._meta.get_field(f)).column))
            for f in fields
        )
        schema_editor.execute(
            f"CREATE UNIQUE INDEX {self.quote(name)} ON {self.quote(model._meta.db_table)} "
            f"({columns})"
        )

    def remove_unique_where_not_null(
        self, schema_editor: BaseDatabaseSchemaEditor, model: type[Model], name: str
    ) -> None:
        schema_editor.execute(
            f"DROP INDEX {self.quote(name)} ON {self.quote(model._meta.db_table)}"
        )

    def max_statement_bytes(self) -> int | None:
        """The server's ``max_allowed_packet``, read once per backend."""
        if self._max_packet is None:
            with self.connection.cursor() as cursor:
                cursor.execute("SELECT @@max_allowed_packet")
                self._max_packet = int(cursor.fetchone()[0])
        return self._max_packet

    @classmethod
    def check_installed(cls, using: str, settings_dict: dict[str, Any]) -> list[CheckMessage]:
        options = settings_dict.get("OPTIONS") or {}
        level = str(options.get("isolation_level", "read committed")).lower()
        if level == "read committed":
            return []
        return [
            Warning(
                f"Database {using!r} runs its transactions in {level.upper()}; "
                "durable_streams' claims and leases are written and tested for READ "
                "COMMITTED (fewer gap locks, so fewer deadlocks between workers).",
                hint='Leave OPTIONS["isolation_level"] unset, or set it to "read committed".',
                id="durable_streams.W003",
            )
        ]

    def check_server(self) -> list[CheckMessage]:
        # Django's MySQL wrapper, which knows the server's flavour and version.
        connection: Any = self.connection
        version: tuple[int, ...] = connection.mysql_version
        minimum: tuple[int, ...]
        if connection.mysql_is_mariadb:
            name, minimum = "MariaDB", MINIMUM_MARIADB
        else:
            name, minimum = "MySQL", MINIMUM_MYSQL
        if version >= minimum:
            return []
        return [
            Error(
                f"Database {self.using!r} is {name} {'.'.join(map(str, version))}; "
                f"durable_streams needs {name} {'.'.join(map(str, minimum))} or later "
                "(SELECT ... FOR UPDATE SKIP LOCKED).",
                hint="Upgrade the server: MariaDB 10.6+ or MySQL 8.0+.",
                id="durable_streams.E007",
            )
        ]
