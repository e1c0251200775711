"""The statements this package writes by hand, as templates that the backend completes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..backends import backend_for

if TYPE_CHECKING:
    from collections.abc import Iterator


HISTORY = """
SELECT 'step', operation, name, NULL, NULL, NULL FROM {step} WHERE workflow_id = %s
UNION ALL
SELECT 'stream', close_operation, {key}, id, {length}, closed_at IS NOT NULL
FROM {stream} WHERE workflow_id = %s
UNION ALL
SELECT 'write_stream', e.operation, s.{key}, NULL, NULL, NULL
FROM {entry} e JOIN {stream} s ON e.stream_id = s.id
WHERE s.workflow_id = %s AND e.operation IS NOT NULL
"""

# Stream.objects.position(): the stream's row and its workflow's status, or no row when
# the workflow does not exist. (key, workflow id)
POSITION = """
SELECT s.id, s.{length}, s.closed_at IS NOT NULL, s.closed_by_end, w.status
FROM {workflow} w LEFT JOIN {stream} s ON s.workflow_id = w.id AND s.{key} = %s
WHERE w.id = %s
"""

# StreamEntry.objects.texts_from(): (stream id, first offset, offset past the last)
ENTRIES = """
SELECT {offset}, {value} FROM {entry}
WHERE stream_id = %s AND {offset} >= %s AND {offset} < %s
ORDER BY {offset}
"""


def table_sql(using: str, template: str, **fields: str) -> str:
    """A statement template of this package with its quoted table and column names
    (and ``fields``)."""
    return backend_for(using).sql(template, **fields)


def chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    # Keeps IN lists under the databases' limits on query parameters.
    for start in range(0, len(items), size):
        yield items[start : start + size]
