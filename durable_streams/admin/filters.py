"""Changelist filters and the changelist itself: nothing counted or listed whole."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.db import connections
from django.db.models import QuerySet
from django.http import (
    HttpRequest,
)
from django.utils.functional import cached_property
from django.utils.translation import gettext_lazy as _

from ..db import alias
from ..models import (
    Workflow,
)
from .display import mark_unknown_workflows

# Values listed by the name and queue filters, at most.
FILTER_VALUES = 100


class IndexedValuesFilter(admin.AllValuesFieldListFilter):
    """The distinct values of an indexed, non-null column, found by hopping through its index.

    ``SELECT DISTINCT`` reads every row of the table; this reads one index entry per
    value (a "loose index scan", written as a recursive query), and at most
    ``FILTER_VALUES`` of them.
    """

    def __init__(
        self,
        field: Any,
        request: HttpRequest,
        params: Any,
        model: Any,
        model_admin: Any,
        field_path: str,
    ) -> None:
        super().__init__(field, request, params, model, model_admin, field_path)
        # Iterated like the queryset it replaces, and queried only then.
        self.lookup_choices = LazyValues(model, field.column, alias())  # type: ignore[assignment]


class LazyValues:
    """Runs the query when the filter is first rendered, as Django's own filter does."""

    def __init__(self, model: Any, column: str, using: str) -> None:
        self.model, self.column, self.using = model, column, using

    @cached_property
    def values(self) -> list[str]:
        connection = connections[self.using]
        table = connection.ops.quote_name(self.model._meta.db_table)
        column = connection.ops.quote_name(self.column)
        sql = (
            f"WITH RECURSIVE hops(value, n) AS ("
            f" SELECT (SELECT {column} FROM {table} ORDER BY {column} LIMIT 1), 1"
            f" UNION ALL"
            f" SELECT (SELECT {column} FROM {table} WHERE {column} > hops.value"
            f" ORDER BY {column} LIMIT 1), n + 1"
            f" FROM hops WHERE hops.value IS NOT NULL AND n < %s"
            f") SELECT value FROM hops WHERE value IS NOT NULL"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [FILTER_VALUES])
            return [row[0] for row in cursor.fetchall()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


class CreatedFilter(admin.DateFieldListFilter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = _("created")


class WorkflowChangeList(ChangeList):
    def get_queryset(
        self, request: HttpRequest, exclude_parameters: Any = None
    ) -> QuerySet[Workflow]:
        # The JSON columns can be large and the list never shows them.
        queryset = super().get_queryset(request, exclude_parameters)
        return queryset.defer("inputs", "output", "error")

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        mark_unknown_workflows(list(self.result_list), alias())
