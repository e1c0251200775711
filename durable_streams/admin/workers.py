"""The worker processes admin: who is running, read-only."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from ..db import alias
from ..models import Status, WorkerProcess, Workflow
from .display import format_time
from .readonly import ReadOnlyAdmin


@admin.register(WorkerProcess)
class WorkerProcessAdmin(ReadOnlyAdmin, admin.ModelAdmin):  # type: ignore[type-arg]  # generic only in the stubs
    list_display = (
        "worker_id",
        "hostname",
        "pid",
        "queues_column",
        "concurrency",
        "running_column",
        "workflows_column",
        "heartbeat_column",
        "started_column",
    )
    search_fields = ("worker_id", "hostname")
    ordering = ("worker_id",)
    list_per_page = 100
    show_facets = admin.ShowFacets.NEVER
    empty_value_display = "—"
    readonly_fields = (
        "worker_id",
        "hostname",
        "pid",
        "process_started_at",
        "started_at",
        "heartbeat_at",
        "queues",
        "concurrency",
        "workflows",
        "workflows_complete",
    )

    class Media:
        css = {"all": ("durable_streams/admin.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkerProcess]:
        held = (
            Workflow.objects.using(alias())
            .filter(status=Status.RUNNING, lease_owner=OuterRef("pk"))
            .order_by()
            .values("lease_owner")
            .annotate(n=Count("pk"))
            .values("n")
        )
        # The runs each worker holds: in the page's one query, not one per row.
        queryset: QuerySet[WorkerProcess] = (
            super()
            .get_queryset(request)
            .using(alias())
            .annotate(running=Coalesce(Subquery(held, output_field=IntegerField()), 0))
        )
        return queryset

    @admin.display(description=_("queues"))
    def queues_column(self, obj: WorkerProcess) -> str:
        return ", ".join(obj.queue_list)

    @admin.display(description=_("running"))
    def running_column(self, obj: WorkerProcess) -> int:
        return int(getattr(obj, "running", 0))

    @admin.display(description=_("workflows"))
    def workflows_column(self, obj: WorkerProcess) -> SafeString:
        names = obj.workflow_names
        shown = str(len(names)) if obj.workflows_complete else f"{len(names)}+"
        return format_html('<span title="{}">{}</span>', "\n".join(names), shown)

    @admin.display(description=_("last heartbeat"), ordering="heartbeat_at")
    def heartbeat_column(self, obj: WorkerProcess) -> SafeString:
        now = timezone.now()
        age = max((now - obj.heartbeat_at).total_seconds(), 0.0)
        if obj.is_alive(now):
            return format_html(
                '<span title="{}">{}</span>',
                format_time(obj.heartbeat_at),
                gettext("%(age).0fs ago") % {"age": age},
            )
        return format_html(
            '<span class="ds-unknown-workflow" title="{}">{}</span>',
            format_time(obj.heartbeat_at),
            gettext("%(age).0fs ago: presumed gone") % {"age": age},
        )

    @admin.display(description=_("started"), ordering="started_at")
    def started_column(self, obj: WorkerProcess) -> str:
        return format_time(obj.started_at)
