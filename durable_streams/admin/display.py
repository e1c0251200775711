"""How the admin shows durations, times, JSON, errors and statuses, and how much of each."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone
from django.utils.formats import number_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from ..models import (
    Status,
    WorkerProcess,
    Workflow,
)

# On the workflow page: the first steps, the first streams, and the last entries of each.
PAGE_STEPS = 50
PAGE_STREAMS = 20
# Messages (newest first) and events (by key) on the workflow's page.
PAGE_MESSAGES = 20
PAGE_EVENTS = 20
PAGE_TAIL = 10
# Entries an open stream's live tail keeps on the page; older ones scroll away.
LIVE_ROWS = 200
# On the paginated history pages.
STEPS_PER_PAGE = 100
ENTRIES_PER_PAGE = 100
# Characters of a value shown in a preview, and on the entries page.
PREVIEW_CHARS = 160
VALUE_CHARS = 4_000
# Shorter values stay on one line, as stored; longer ones are indented.
INLINE_CHARS = 100
# Characters of a workflow's inputs, output or error shown on its page; the whole is a
# download away (a 50 MB argument made a 52 MB page).
DETAIL_CHARS = 16_000
JSON_FIELDS = ("inputs", "output", "error")
# Refused workflows named in a message, at most.
NAMED_IN_MESSAGE = 5


def format_duration(value: timedelta | None) -> str:
    if value is None:
        return ""
    seconds = max(value.total_seconds(), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def format_time(value: datetime | None) -> str:
    if value is None:
        return ""
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S")


def format_when(value: datetime) -> str:
    """Short, for a list: the time today, the day this year, the date before that."""
    local, today = timezone.localtime(value), timezone.localdate()
    if local.date() == today:
        return local.strftime("%H:%M:%S")
    if local.year == today.year:
        return local.strftime("%b %d, %H:%M")
    return local.strftime("%Y-%m-%d")


def pretty_json(text: str | None) -> str | None:
    """Indented JSON for reading; the stored text itself when it is not JSON."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return json.dumps(value, indent=2, ensure_ascii=False)


def decode_error(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"type": "Error", "message": text, "traceback": ""}
    if not isinstance(record, dict):
        return {"type": "Error", "message": str(record), "traceback": ""}
    return {
        "type": str(record.get("type") or "Error"),
        "message": str(record.get("message") or ""),
        "traceback": str(record.get("traceback") or ""),
    }


# The type that leads an error record, readable from the head of a record cut short.
_ERROR_TYPE = re.compile(r'\{\s*"type"\s*:\s*("(?:[^"\\]|\\.)*")')


@dataclass(frozen=True)
class Detail:
    """A JSON column as the workflow page shows it: whole when short, else its head."""

    text: str
    size: int
    url: str

    @property
    def cut(self) -> bool:
        return self.size > DETAIL_CHARS

    @property
    def shown_text(self) -> str:
        return number_format(min(self.size, DETAIL_CHARS), force_grouping=True)

    @property
    def size_text(self) -> str:
        return number_format(self.size, force_grouping=True)

    @classmethod
    def of(cls, head: str | None, size: int | None, url: str) -> Detail | None:
        if head is None or size is None:
            return None
        if size > DETAIL_CHARS:
            return cls(head[:DETAIL_CHARS], size, url)
        return cls(pretty_json(head) or "", size, url)


def error_type_of(head: str) -> str:
    """The type named at the start of a stored error record, if it can be read there."""
    match = _ERROR_TYPE.match(head)
    if match is not None:
        try:
            return str(json.loads(match.group(1))) or "Error"
        except ValueError:
            pass
    return "Error"


def clip(head: str | None, limit: int) -> tuple[str, bool]:
    """The first ``limit`` characters of a text fetched as ``limit + 1``, and whether it was cut."""
    if head is None:
        return "", False
    if len(head) > limit:
        return head[:limit], True
    return head, False


def short_id(workflow_id: str) -> str:
    return workflow_id if len(workflow_id) <= 13 else f"{workflow_id[:8]}…"


STATUS_LABELS = dict(Status.choices)


def status_badge(status: str) -> SafeString:
    label = STATUS_LABELS.get(status, status)
    return format_html('<span class="ds-badge ds-badge-{}">{}</span>', str(status).lower(), label)


UNKNOWN_WORKFLOW = _("No running worker knows this workflow")
UNKNOWN_WORKFLOW_HINT = _(
    "No live worker has registered it, so none will take this run. Define the workflow in a "
    "workflows.py module of an installed app (workers import those at start-up, like "
    "admin.py), and run the workers with the same code as the process that started it."
)


def mark_unknown_workflows(runs: list[Workflow], using: str) -> None:
    """Set ``unknown_workflow`` on each run: enqueued, and no live worker knows its name.

    One query for the whole list, and none when no run in it is enqueued.
    """
    enqueued = [run for run in runs if run.status == Status.ENQUEUED]
    known = WorkerProcess.objects.using(using).known_names() if enqueued else None
    for run in runs:
        # None: a worker's list was cut, so no name can be said to be unknown.
        run.unknown_workflow = (  # type: ignore[attr-defined]  # shown by the admin only
            known is not None and run.status == Status.ENQUEUED and run.name not in known
        )


def unknown_workflow_mark() -> SafeString:
    return format_html(
        '<span class="ds-unknown-workflow" title="{}">{}</span>',
        UNKNOWN_WORKFLOW_HINT,
        UNKNOWN_WORKFLOW,
    )
