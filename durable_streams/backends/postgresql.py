"""PostgreSQL (psycopg 3): single prepared statements for the hot paths, LISTEN/NOTIFY.

Notifications are sent after the commit, not inside it: PostgreSQL serializes the
commits of notifying transactions, disk flush included, so a ``NOTIFY`` in every data
transaction would make every commit wait for the others. The notifier's own
transactions write nothing, so theirs cost no flush.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.core.checks import Error
from django.db import IntegrityError
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from ..conf import get_config
from .base import Backend

if TYPE_CHECKING:
    from django.core.checks import CheckMessage
    from django.db.models import Model

# The channel every process listens on; the payload is the topic.
CHANNEL = "durable_streams"


# The claim, locked and leased in one statement whose text does not change with the
# lists in it (so it is prepared once): claimable workflows with attempts left,
# expired leases first, then waiting runs whose timer is due or whose message arrived
# (a message committed after this snapshot announces the queue again, so a later claim
# sees it). Each SELECT goes through its own partial index in created_at order: one
# SELECT with an OR of them would sort every enqueued row on every claim. Rows the
# later SELECTs lock beyond the limit are let go when the statement commits.
# The last column says whether to load what earlier runs recorded: a queued row was
# queued again only after those runs' writes committed, so this snapshot sees them;
# a reclaimed row is always loaded, since its last holder may have committed a write
# between this statement's snapshot and its lock.
_CLAIM = """
WITH expired AS (
    SELECT id, status, lease_owner FROM {workflow}
    WHERE status = 'RUNNING' AND lease_expires_at < %(now)s
        AND queue = ANY(%(queues)s::text[]) AND name = ANY(%(names)s::text[])
        AND attempts < max_attempts AND NOT id = ANY(%(exclude)s::text[])
    ORDER BY created_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
enqueued AS (
    SELECT id, status, lease_owner FROM {workflow}
    WHERE status = 'ENQUEUED'
        AND queue = ANY(%(queues)s::text[]) AND name = ANY(%(names)s::text[])
        AND attempts < max_attempts AND NOT id = ANY(%(exclude)s::text[])
    ORDER BY created_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
woken AS (
    SELECT id, status, lease_owner FROM {workflow} w0
    WHERE status = 'WAITING'
        AND queue = ANY(%(queues)s::text[]) AND name = ANY(%(names)s::text[])
        AND attempts < max_attempts AND NOT id = ANY(%(exclude)s::text[])
        AND (wake_at <= %(now)s OR EXISTS (
            SELECT FROM {message} m
            WHERE m.destination_id = w0.id AND m.topic = w0.wait_topic
                AND m.consumed_operation IS NULL))
    ORDER BY created_at LIMIT %(limit)s
    FOR UPDATE OF w0 SKIP LOCKED
),
picked AS (
    SELECT * FROM expired UNION ALL SELECT * FROM woken UNION ALL SELECT * FROM enqueued
    LIMIT %(limit)s
)
UPDATE {workflow} w
SET status = 'RUNNING', lease_owner = %(worker)s, lease_expires_at = %(until)s,
    attempts = w.attempts + 1, updated_at = %(now)s, started_at = COALESCE(w.started_at, %(now)s)
FROM picked
WHERE w.id = picked.id
RETURNING w.id, w.name, w.inputs, w.attempts, picked.status, picked.lease_owner,
    picked.status IN ('RUNNING', 'WAITING') OR w.wait_operation IS NOT NULL
    OR EXISTS (SELECT FROM {step} s WHERE s.workflow_id = w.id)
    OR EXISTS (SELECT FROM {stream} s WHERE s.workflow_id = w.id)
"""

# The rows a worker's end of a run targets: (workflow id, worker)
_HELD_TARGET = """
SELECT id AS pk FROM {workflow} WHERE id = %s AND status = 'RUNNING' AND lease_owner = %s
"""

# Lock the row if the target still matches it (the fence), record the end, and close
# the open streams.
_FINISH = """
WITH target AS ({target} FOR UPDATE),
finished AS (
    UPDATE {workflow} w
    SET status = %s, output = %s, error = %s, finished_at = %s, updated_at = %s,
        lease_owner = NULL, lease_expires_at = NULL
    FROM target
    WHERE w.id = target.pk
    RETURNING w.id
),
closed AS (
    UPDATE {stream} SET closed_at = %s, closed_by_end = true
    WHERE workflow_id IN (SELECT id FROM finished) AND closed_at IS NULL
)
SELECT count(*) FROM finished
"""

# The INSERT selects from the fencing UPDATE: no row, nothing stored. ``flush`` sets
# synchronous_commit for this statement's own transaction only. Off, the commit does
# not wait for the disk: the write-ahead log is flushed in order, so the next commit
# that waits (a stream value, the workflow's end, any other transaction) makes this
# checkpoint durable too, and a crash of the database server before then can only
# lose checkpoints that nothing durable depends on yet. Their steps run again, as
# any step may. A worker's crash loses nothing: the checkpoint is committed.
_CHECKPOINT = """
WITH commit_mode AS (SELECT set_config('synchronous_commit', '{flush}', true)),
fence AS (
    UPDATE {workflow} SET lease_expires_at = %s
    WHERE id = %s AND status = 'RUNNING' AND lease_owner = %s
    RETURNING id
)
INSERT INTO {step} ({columns}) SELECT {values} FROM fence CROSS JOIN commit_mode
"""

# The writer's batch in one round trip: lock the workflows' rows that their workers
# still hold (in primary-key order, like every other locker), create the new streams,
# update the others, insert the values, insert the step checkpoints and renew those
# workflows' leases, all for the held workflows only; return the held ids and the new
# streams' ids. Outside a transaction it commits on its own.
_STORE_BATCH = """
WITH held AS (
    SELECT w.id FROM {workflow} w
    JOIN unnest(%(held_ids)s::text[], %(held_owners)s::text[]) AS h(id, owner)
        ON w.id = h.id AND w.lease_owner = h.owner
    WHERE w.status = 'RUNNING'
    ORDER BY w.id
    FOR UPDATE OF w
),
created AS (
    INSERT INTO {stream} (workflow_id, "key", "length", created_at, closed_at,
                          close_operation, closed_by_end)
    SELECT n.workflow_id, n.key, COALESCE(n.length, 0), %(now)s, n.closed_at,
           n.close_operation, false
    FROM unnest(%(new_workflows)s::text[], %(new_keys)s::text[], %(new_lengths)s::integer[],
                %(new_closed)s::timestamptz[], %(new_close_operations)s::integer[])
        AS n(workflow_id, key, length, closed_at, close_operation)
    WHERE n.workflow_id IN (SELECT id FROM held)
    RETURNING id, workflow_id, "key"
),
updated AS (
    UPDATE {stream} s
    SET "length" = COALESCE(u.length, s."length"),
        closed_at = COALESCE(u.closed_at, s.closed_at),
        close_operation = CASE WHEN u.closed_at IS NULL THEN s.close_operation
                               ELSE u.close_operation END
    FROM unnest(%(old_ids)s::bigint[], %(old_workflows)s::text[], %(old_lengths)s::integer[],
                %(old_closed)s::timestamptz[], %(old_close_operations)s::integer[])
        AS u(id, workflow_id, length, closed_at, close_operation)
    WHERE s.id = u.id AND u.workflow_id IN (SELECT id FROM held)
),
inserted AS (
    INSERT INTO {entry} (stream_id, "offset", "value", operation, created_at)
    SELECT COALESCE(e.stream_id, c.id), e.offset, e.value, e.operation, %(now)s
    FROM unnest(%(entry_streams)s::bigint[], %(entry_workflows)s::text[],
                %(entry_keys)s::text[], %(entry_offsets)s::integer[], %(entry_values)s::text[],
                %(entry_operations)s::integer[])
        AS e(stream_id, workflow_id, key, "offset", value, operation)
    LEFT JOIN created c
        ON e.stream_id IS NULL AND c.workflow_id = e.workflow_id AND c.key = e.key
    WHERE e.workflow_id IN (SELECT id FROM held)
),
renewed AS (
    UPDATE {workflow} SET lease_expires_at = %(lease_until)s
    WHERE id IN (SELECT id FROM held) AND id = ANY(%(step_workflows)s::text[])
),
checkpoints AS (
    INSERT INTO {step} (workflow_id, operation, name, status, output, error, attempts,
                        started_at, finished_at)
    SELECT c.* FROM unnest(%(step_workflows)s::text[], %(step_operations)s::integer[],
                           %(step_names)s::text[], %(step_statuses)s::text[],
                           %(step_outputs)s::text[], %(step_errors)s::text[],
                           %(step_attempts)s::integer[], %(step_started)s::timestamptz[],
                           %(step_finished)s::timestamptz[])
        AS c(workflow_id, operation, name, status, output, error, attempts, started_at,
             finished_at)
    WHERE c.workflow_id IN (SELECT id FROM held)
)
SELECT h.id, NULL, NULL FROM held h
UNION ALL
SELECT c.workflow_id, c.key, c.id FROM created c
"""

STEP_COLUMNS = (
    "workflow_id",
    "operation",
    "name",
    "status",
    "output",
    "error",
    "attempts",
    "started_at",
    "finished_at",
)


class PostgreSQLBackend(Backend):
    vendor = "postgresql"
    display_name = "PostgreSQL"
    one_statement = True
    notifies = True

    # Statements of durable_streams' own

    def run(self, sql: str, params: Any) -> tuple[list[tuple[Any, ...]], int]:
        """Run one of durable_streams' own statements; return its rows and row count.

        These few statements (the writer's batch, checkpoints, claims, a workflow's end)
        are long and run on every step: PostgreSQL spends more time planning them than
        running them. They bind their parameters on the server, and with
        ``PREPARED_STATEMENTS`` (the default) psycopg prepares each once per connection.
        Django's own queries bind in the client and are never prepared, and the
        connection's ``prepare_threshold`` is left as it was for them.
        """
        import psycopg  # the postgres extra; check_installed() requires it

        wrapper = self.connection
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
                _LoggedStatement(raw, wrapper)
                if wrapper.queries_logged
                else wrapper.make_cursor(raw)  # type: ignore[arg-type]
            )
            with cursor:
                cursor.execute(sql, params)
                rows = cursor.fetchall() if cursor.description is not None else []
                return rows, cursor.rowcount
        finally:
            connection.prepare_threshold = threshold

    def fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.run(sql, params)[0]

    def insert_unless_taken(self, row: Model) -> bool:
        # Prepared, like the worker's statements: starting many is a hot path too.
        fields = row._meta.concrete_fields
        in_transaction = self.connection.in_atomic_block
        # Outside a transaction the plain INSERT, a little cheaper, is used; inside one
        # an error would break the caller's transaction.
        sql = self.insert_sql(type(row), skip_taken=in_transaction)
        values = [getattr(row, field.attname) for field in fields]
        try:
            _, inserted = self.run(sql, values)
        except IntegrityError:
            if (
                in_transaction
                or not type(row)._default_manager.using(self.using).filter(pk=row.pk).exists()
            ):
                raise
            return False
        return inserted == 1

    def claim(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Claim rows: (id, name, inputs, attempts, previous status, previous owner, recorded)."""
        return self.run(self.sql(_CLAIM), params)[0]

    def held_target(self) -> str:
        """A ``finish()`` target: the run (workflow id, worker) if that worker holds it."""
        return self.sql(_HELD_TARGET)

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
        sql = self.sql(_FINISH, target=target_sql)
        rows, _ = self.run(sql, [*target_params, status, output, error, now, now, now])
        return bool(rows and rows[0][0])

    def checkpoint(self, step: Any, worker_id: str, lease_until: datetime, *, flush: bool) -> bool:
        """Insert ``step`` if the worker holds its workflow, renewing the lease. One
        statement, committed on its own outside a transaction."""
        sql = self.sql(
            _CHECKPOINT,
            columns=", ".join(STEP_COLUMNS),
            values=", ".join(["%s"] * len(STEP_COLUMNS)),
            flush="on" if flush else "off",
        )
        values = [getattr(step, column) for column in STEP_COLUMNS]
        _, count = self.run(sql, [lease_until, step.workflow_id, worker_id, *values])
        return count == 1

    def store_batch(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The writer's batch: rows (held workflow id, None, None) and (workflow id, key,
        new stream id)."""
        return self.run(self.sql(_STORE_BATCH), params)[0]

    # LISTEN/NOTIFY

    def notification_connection(self) -> Any:
        """A new autocommit psycopg connection of its own, for LISTEN or NOTIFY."""
        import psycopg  # the postgres extra; check_installed() requires it

        params = self.connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        return psycopg.connect(**params, autocommit=True)

    def session_id(self, conn: Any) -> int:
        return int(conn.info.backend_pid)

    def send_notifications(self, conn: Any, topics: list[str]) -> None:
        conn.execute(
            "SELECT pg_notify(%s, topic) FROM unnest(%s::text[]) AS topic", [CHANNEL, topics]
        )

    def listen(self, conn: Any) -> None:
        conn.execute(f"LISTEN {CHANNEL}")

    def notifications(self, conn: Any, timeout: float) -> Iterator[tuple[int, str]]:
        """(sending session, topic) of what arrives within ``timeout`` seconds."""
        for notification in conn.notifies(timeout=timeout):
            yield notification.pid, notification.payload

    # System checks

    @classmethod
    def check_installed(cls, using: str, settings_dict: dict[str, Any]) -> list[CheckMessage]:
        if importlib.util.find_spec("psycopg") is not None:
            return []
        found = "psycopg2" if importlib.util.find_spec("psycopg2") is not None else "no psycopg"
        return [
            Error(
                f"Database {using!r} is PostgreSQL, which durable_streams runs on psycopg 3 "
                f"(its own statements, LISTEN/NOTIFY); {found} is installed.",
                hint='pip install "durable-streams[postgres]"',
                id="durable_streams.E006",
            )
        ]


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
    import psycopg  # the postgres extra; check_installed() requires it

    try:
        return psycopg.ClientCursor(cursor.connection).mogrify(sql, params)
    except Exception:
        return sql
