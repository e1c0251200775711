"""Cancel, resume and retry, in batches, for the changelist and the workflow page."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.db.models import QuerySet
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

from ..api import cancel_workflow
from ..bus import publish_changes
from ..exceptions import WorkflowNotFound
from ..models import (
    ACTIVE_STATUSES,
    RESUMABLE_STATUSES,
    Workflow,
)

# Actions


@dataclass(frozen=True)
class ActionResult:
    changed: list[str]
    refused: list[str]


def batches(items: Iterable[str], size: int = 500) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cancel_all(queryset: QuerySet[Workflow]) -> ActionResult:
    """Cancel each active workflow through the API, one transaction each."""
    changed: list[str] = []
    refused = list(queryset.exclude(status__in=ACTIVE_STATUSES).values_list("pk", flat=True))
    for workflow_id in queryset.filter(status__in=ACTIVE_STATUSES).values_list("pk", flat=True):
        try:
            done = cancel_workflow(workflow_id)
        except WorkflowNotFound:
            continue
        (changed if done else refused).append(workflow_id)
    return ActionResult(changed, refused)


def resume_all(queryset: QuerySet[Workflow]) -> ActionResult:
    resumed, changes = queryset.resume()  # type: ignore[attr-defined]  # a WorkflowQuerySet
    publish_changes(changes, queryset.db)
    done = set(resumed)
    refused = [pk for pk in queryset.values_list("pk", flat=True) if pk not in done]
    return ActionResult(resumed, refused)


def retry_all(queryset: QuerySet[Workflow]) -> tuple[ActionResult, list[str]]:
    pairs, changes = queryset.retry()  # type: ignore[attr-defined]  # a WorkflowQuerySet
    publish_changes(changes, queryset.db)
    originals = {original for original, _ in pairs}
    refused = [pk for pk in queryset.values_list("pk", flat=True) if pk not in originals]
    return ActionResult([original for original, _ in pairs], refused), [new for _, new in pairs]


@dataclass(frozen=True)
class ActionSpec:
    name: str
    permission: str
    applies_to: frozenset[str]
    button: str | Promise  # translated when shown
    confirm: str | Promise


OBJECT_ACTIONS = {
    "cancel": ActionSpec(
        "cancel",
        "cancel",
        ACTIVE_STATUSES,
        _("Cancel"),
        _("Cancel this workflow? It stops at its next step and its open streams are interrupted."),
    ),
    "resume": ActionSpec(
        "resume",
        "resume",
        RESUMABLE_STATUSES,
        _("Resume"),
        _("Resume this workflow from its checkpoints?"),
    ),
    "retry": ActionSpec(
        "retry",
        "retry",
        RESUMABLE_STATUSES,
        _("Retry from scratch"),
        _("Start a new run of this workflow with the same inputs?"),
    ),
}
