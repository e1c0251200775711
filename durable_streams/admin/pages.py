"""The pieces of the workflow page and its history pages: rows, panels and pagers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
)
from django.utils.formats import number_format
from django.utils.functional import cached_property
from django.utils.translation import gettext

from ..models import (
    Step,
    Stream,
    StreamEntry,
)
from .display import (
    DETAIL_CHARS,
    INLINE_CHARS,
    PREVIEW_CHARS,
    VALUE_CHARS,
    clip,
    decode_error,
    error_type_of,
    format_duration,
    format_time,
    pretty_json,
)

# The changelist's count

# Beyond this many matching rows the changelist says "More than 10,000" instead of counting.
COUNT_LIMIT = 10_000


class CappedCountPaginator(Paginator):  # type: ignore[type-arg]  # generic only in the stubs
    """Counts at most ``COUNT_LIMIT + 1`` rows: a full COUNT(*) of a large table is slow."""

    @cached_property
    def count(self) -> int:
        object_list: Any = self.object_list
        if isinstance(object_list, QuerySet):
            return object_list.order_by()[: COUNT_LIMIT + 1].count()
        return len(object_list)

    @property
    def limit(self) -> int:
        return COUNT_LIMIT

    @property
    def capped(self) -> bool:
        return self.count > COUNT_LIMIT


# Rows shown on the pages


@dataclass(frozen=True)
class StepRow:
    operation: int
    name: str
    status: str
    attempts: int
    started_at: str
    duration: str
    output: str
    output_cut: bool
    error: dict[str, str] | None

    @classmethod
    def of(cls, step: Step) -> StepRow:
        # output_head: annotated by the page's queryset.
        output, cut = clip(step.output_head, PREVIEW_CHARS)  # type: ignore[attr-defined]
        return cls(
            operation=step.operation,
            name=step.name,
            status=step.status,
            attempts=step.attempts,
            started_at=format_time(step.started_at),
            duration=format_duration(step.duration),
            output=output,
            output_cut=cut,
            # error_head: annotated by the page's queryset.
            error=step_error(step.error_head),  # type: ignore[attr-defined]  # annotated field
        )


def step_error(head: str | None) -> dict[str, str] | None:
    """A step's error record for the steps table, from at most DETAIL_CHARS + 1 of it.

    A record cut short is no JSON any more: its type, read from its head, and a note.
    """
    text, cut = clip(head, DETAIL_CHARS)
    if not cut:
        return decode_error(head)
    return {
        "type": error_type_of(text),
        "message": gettext("the error record is longer than %(limit)s characters; not shown")
        % {"limit": number_format(DETAIL_CHARS, force_grouping=True)},
        "traceback": "",
    }


@dataclass(frozen=True)
class EntryRow:
    offset: int
    operation: int | None
    written_at: str
    value: str
    cut: bool
    more: int

    @property
    def more_text(self) -> str:
        return number_format(self.more, force_grouping=True)

    @classmethod
    def preview(cls, entry: StreamEntry) -> EntryRow:
        # value_head: annotated by the page's queryset.
        value, cut = clip(entry.value_head, PREVIEW_CHARS)  # type: ignore[attr-defined]
        return cls(entry.offset, entry.operation, format_time(entry.created_at), value, cut, 0)

    @classmethod
    def full(cls, entry: StreamEntry) -> EntryRow:
        # value_head and value_size: annotated by the page's queryset.
        value, cut = clip(entry.value_head, VALUE_CHARS)  # type: ignore[attr-defined]
        size: int = entry.value_size  # type: ignore[attr-defined]
        if not cut and len(value) > INLINE_CHARS:
            value = pretty_json(value) or ""
        return cls(
            entry.offset,
            entry.operation,
            format_time(entry.created_at),
            value,
            cut,
            size - VALUE_CHARS if cut else 0,
        )


@dataclass(frozen=True)
class StreamPanel:
    stream: Stream
    entries: list[EntryRow]

    @property
    def first_offset(self) -> int:
        return self.entries[0].offset if self.entries else self.stream.length


@dataclass(frozen=True)
class Pager:
    """Offset pagination over a sequence of known length."""

    offset: int
    per_page: int
    total: int
    # "Steps %(first)s–%(last)s of %(total)s"; ``one_based`` numbers them from 1.
    label: str
    one_based: bool = False
    jump: bool = False

    @property
    def end(self) -> int:
        return min(self.offset + self.per_page, self.total)

    @property
    def previous(self) -> int | None:
        return max(self.offset - self.per_page, 0) if self.offset > 0 else None

    @property
    def next(self) -> int | None:
        return self.end if self.end < self.total else None

    @property
    def last(self) -> int:
        return max(self.total - 1, 0) // self.per_page * self.per_page

    @property
    def last_index(self) -> int:
        return max(self.total - 1, 0)

    @property
    def text(self) -> str:
        base = 1 if self.one_based else 0
        return self.label % {
            "first": number_format(self.offset + base, force_grouping=True),
            "last": number_format(self.end - 1 + base, force_grouping=True),
            "total": number_format(self.total, force_grouping=True),
        }


# ASCII digits only ("²".isdigit() is true, and int() refuses it), and few enough of
# them for int(), which refuses more than 4,300.
_OFFSET_DIGITS = re.compile(r"[0-9]{1,18}")


def offset_param(request: HttpRequest, total: int) -> int | HttpResponse:
    raw = request.GET.get("offset", "0").strip() or "0"
    if not _OFFSET_DIGITS.fullmatch(raw) or int(raw) > max(total - 1, 0):
        shown = raw if len(raw) <= 40 else f"{raw[:40]}…"
        return HttpResponseBadRequest(
            f"offset must be a whole number from 0 to {max(total - 1, 0)}, not {shown!r}.",
            content_type="text/plain; charset=utf-8",
        )
    return int(raw)
