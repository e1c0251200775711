"""The workflow admin: the changelist, the page of one workflow and its history pages."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.db.models.functions import Length, Lower, Substr
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from ..db import alias
from ..models import (
    Event,
    Message,
    Step,
    Stream,
    StreamEntry,
    Workflow,
)
from ..scheduler import list_schedules
from .actions import OBJECT_ACTIONS, ActionResult, batches, cancel_all, resume_all, retry_all
from .display import (
    DETAIL_CHARS,
    ENTRIES_PER_PAGE,
    JSON_FIELDS,
    LIVE_ROWS,
    NAMED_IN_MESSAGE,
    PAGE_EVENTS,
    PAGE_MESSAGES,
    PAGE_STEPS,
    PAGE_STREAMS,
    PAGE_TAIL,
    PREVIEW_CHARS,
    STEPS_PER_PAGE,
    UNKNOWN_WORKFLOW,
    UNKNOWN_WORKFLOW_HINT,
    VALUE_CHARS,
    Detail,
    clip,
    decode_error,
    error_type_of,
    format_duration,
    format_time,
    format_when,
    mark_unknown_workflows,
    short_id,
    status_badge,
    unknown_workflow_mark,
)
from .filters import CreatedFilter, IndexedValuesFilter, WorkflowChangeList
from .pages import CappedCountPaginator, EntryRow, Pager, StepRow, StreamPanel, offset_param
from .readonly import ReadOnlyAdmin


def _value_heads(queryset: QuerySet[Any], limit: int) -> list[Any]:
    """The first ``limit`` rows and one more (is there more?), each with the head of its
    value (``value_head``) instead of the value."""
    return list(
        queryset.defer("value").annotate(value_head=Substr("value", 1, PREVIEW_CHARS + 1))[
            : limit + 1
        ]
    )


@admin.register(Workflow)
class WorkflowAdmin(ReadOnlyAdmin, admin.ModelAdmin):  # type: ignore[type-arg]  # generic only in the stubs
    list_display = (
        "id_column",
        "name_column",
        "status_column",
        "queue",
        "owner",
        "created_column",
        "duration_column",
        "attempts_column",
        "worker_column",
    )
    list_display_links = ("id_column", "name_column")
    list_filter = (
        "status",
        ("name", IndexedValuesFilter),
        ("queue", IndexedValuesFilter),
        ("created_at", CreatedFilter),
    )
    search_fields = ("id", "name")
    search_help_text = _("A workflow id (or its beginning), or part of a workflow name.")
    ordering = ("-created_at",)
    list_select_related = ("owner",)
    list_per_page = 50
    show_full_result_count = False
    # Facet counts run one COUNT per filter choice: too slow on a large table.
    show_facets = admin.ShowFacets.NEVER
    paginator = CappedCountPaginator
    empty_value_display = "—"
    actions = ("cancel_selected", "resume_selected", "retry_selected")
    # The page is rendered by its template; this only names the form's one field.
    fields = ("name",)

    class Media:
        css = {"all": ("durable_streams/admin.css",)}

    def _has(self, request: HttpRequest, codename: str) -> bool:
        return bool(request.user.has_perm(f"{self.opts.app_label}.{codename}"))

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "cancel_workflow")

    def has_resume_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "resume_workflow")

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "retry_workflow")

    # Queries

    def get_queryset(self, request: HttpRequest) -> QuerySet[Workflow]:
        # The JSON columns can be huge: the page reads their heads (workflow_context),
        # the download view the whole of one.
        return super().get_queryset(request).using(alias()).defer(*JSON_FIELDS)

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> Workflow | None:
        # No workflow's id holds a NUL, and PostgreSQL fails the query that looks for one.
        if "\x00" in object_id:
            return None
        return super().get_object(request, object_id, from_field)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return WorkflowChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Workflow], search_term: str
    ) -> tuple[QuerySet[Workflow], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        # An id, or the beginning of one, finds its workflows through the primary key's
        # index; anything else searches the names.
        by_id = queryset.filter(pk__startswith=term)
        if by_id.exists():
            return by_id, False
        # Lower() on both sides, not icontains: case-insensitive whatever the column's
        # collation (a case-sensitive one makes icontains case-sensitive on some databases).
        return queryset.alias(lower_name=Lower("name")).filter(
            lower_name__contains=term.lower()
        ), False

    # Columns

    @admin.display(description=_("ID"), ordering="pk")
    def id_column(self, obj: Workflow) -> SafeString:
        return format_html('<code class="ds-id" title="{}">{}</code>', obj.pk, short_id(obj.pk))

    @admin.display(description=_("name"), ordering="name")
    def name_column(self, obj: Workflow) -> SafeString:
        # The function's name first; its module, smaller, below.
        module, _dot, function = obj.name.rpartition(".")
        if not module or not function:
            return format_html('<span class="ds-name">{}</span>', obj.name)
        return format_html(
            '<span class="ds-name" title="{}">{}</span><span class="ds-module">{}</span>',
            obj.name,
            function,
            module,
        )

    @admin.display(description=_("status"), ordering="status")
    def status_column(self, obj: Workflow) -> SafeString:
        # unknown_workflow: set by the changelist for the page, in one query.
        if getattr(obj, "unknown_workflow", False):
            return format_html("{}{}", status_badge(obj.status), unknown_workflow_mark())
        return status_badge(obj.status)

    @admin.display(description=_("created"), ordering="created_at")
    def created_column(self, obj: Workflow) -> SafeString:
        return format_html(
            '<time datetime="{}" title="{}">{}</time>',
            obj.created_at.isoformat(),
            format_time(obj.created_at),
            format_when(obj.created_at),
        )

    @admin.display(description=_("duration"))
    def duration_column(self, obj: Workflow) -> str:
        return format_duration(obj.duration)

    @admin.display(description=_("attempts"), ordering="attempts")
    def attempts_column(self, obj: Workflow) -> str:
        return f"{obj.attempts}/{obj.max_attempts}"

    @admin.display(description=_("worker"), ordering="lease_owner")
    def worker_column(self, obj: Workflow) -> SafeString | None:
        if not obj.lease_owner:
            return None
        worker = obj.lease_owner
        shown = worker if len(worker) <= 16 else f"{worker[:15]}…"
        return format_html('<span title="{}">{}</span>', worker, shown)

    # Actions

    def _report(self, request: HttpRequest, outcome: ActionResult, done: str, refused: str) -> None:
        """Say how many workflows changed and which were refused; ``refused`` names them."""
        if outcome.changed:
            self.message_user(request, done, messages.SUCCESS)
            self._log(request, outcome.changed, done)
        if outcome.refused:
            names = ", ".join(short_id(pk) for pk in outcome.refused[:NAMED_IN_MESSAGE])
            if len(outcome.refused) > NAMED_IN_MESSAGE:
                names += ", …"
            self.message_user(request, refused % {"ids": names}, messages.WARNING)

    def _log(self, request: HttpRequest, workflow_ids: list[str], message: str) -> None:
        # The admin's history of each workflow records who acted on it.
        for batch in batches(workflow_ids):
            objects = list(self.get_queryset(request).filter(pk__in=batch).only("pk", "name"))
            LogEntry.objects.log_actions(
                user_id=request.user.pk,  # type: ignore[arg-type]  # signed in: it has one
                queryset=objects,
                action_flag=CHANGE,
                change_message=message,
            )

    def _cancel(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> ActionResult:
        outcome = cancel_all(queryset)
        changed, refused = len(outcome.changed), len(outcome.refused)
        self._report(
            request,
            outcome,
            ngettext("Cancelled %(count)d workflow.", "Cancelled %(count)d workflows.", changed)
            % {"count": changed},
            ngettext(
                "%(count)d workflow was not cancelled: it had already ended (%%(ids)s).",
                "%(count)d workflows were not cancelled: they had already ended (%%(ids)s).",
                refused,
            )
            % {"count": refused},
        )
        return outcome

    def _resume(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> ActionResult:
        outcome = resume_all(queryset)
        changed, refused = len(outcome.changed), len(outcome.refused)
        self._report(
            request,
            outcome,
            ngettext(
                "Resumed %(count)d workflow: it is back in the queue.",
                "Resumed %(count)d workflows: they are back in the queue.",
                changed,
            )
            % {"count": changed},
            ngettext(
                "%(count)d workflow was not resumed: only failed or cancelled workflows "
                "can be (%%(ids)s).",
                "%(count)d workflows were not resumed: only failed or cancelled workflows "
                "can be (%%(ids)s).",
                refused,
            )
            % {"count": refused},
        )
        return outcome

    def _retry(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> list[str]:
        outcome, new_ids = retry_all(queryset)
        changed, refused = len(outcome.changed), len(outcome.refused)
        self._report(
            request,
            outcome,
            ngettext(
                "Retried %(count)d workflow from scratch as a new run.",
                "Retried %(count)d workflows from scratch as new runs.",
                changed,
            )
            % {"count": changed},
            ngettext(
                "%(count)d workflow was not retried: only failed or cancelled workflows "
                "can be (%%(ids)s).",
                "%(count)d workflows were not retried: only failed or cancelled workflows "
                "can be (%%(ids)s).",
                refused,
            )
            % {"count": refused},
        )
        return new_ids

    @admin.action(description=_("Cancel selected workflows"), permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> None:
        self._cancel(request, queryset)

    @admin.action(
        description=_("Resume selected workflows from their checkpoints"),
        permissions=["resume"],
    )
    def resume_selected(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> None:
        self._resume(request, queryset)

    @admin.action(
        description=_("Retry selected workflows from scratch (new runs)"),
        permissions=["retry"],
    )
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> None:
        self._retry(request, queryset)

    # URLs

    def get_urls(self) -> list[Any]:
        info = self.opts.app_label, self.opts.model_name
        wrap = self.admin_site.admin_view
        return [
            path(
                "schedules/",
                wrap(self.schedules_view),
                name=f"{info[0]}_{info[1]}_schedules",
            ),
            path(
                "<path:object_id>/act/<str:action>/",
                wrap(self.object_action_view),
                name=f"{info[0]}_{info[1]}_act",
            ),
            path(
                "<path:object_id>/json/<str:field>/",
                wrap(self.json_view),
                name=f"{info[0]}_{info[1]}_json",
            ),
            path(
                "<path:object_id>/steps/",
                wrap(self.steps_view),
                name=f"{info[0]}_{info[1]}_steps",
            ),
            path(
                "<path:object_id>/streams/<int:stream_id>/",
                wrap(self.stream_view),
                name=f"{info[0]}_{info[1]}_stream",
            ),
            *super().get_urls(),
        ]

    def _url(self, name: str, *args: Any) -> str:
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_{name}",
            args=args,
            current_app=self.admin_site.name,
        )

    def _viewable(self, request: HttpRequest, object_id: str) -> Workflow:
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            raise Http404(gettext("No workflow with id %(id)r.") % {"id": unquote(object_id)})
        if not self.has_view_permission(request, obj):
            raise PermissionDenied
        return obj

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # Filters and the search put these values into queries, and PostgreSQL fails a
        # query holding a NUL (a DataError, so a 500) where no row could match anyway.
        for name, values in request.GET.lists():
            if any("\x00" in value for value in [name, *values]):
                return HttpResponseBadRequest(
                    gettext("The parameter %(name)r must not contain NUL characters.")
                    % {"name": name.replace("\x00", "")},
                    content_type="text/plain; charset=utf-8",
                )
        return super().changelist_view(
            request,
            {"title": str(self.opts.verbose_name_plural).capitalize(), **(extra_context or {})},
        )

    # The workflow page

    def object_action_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        spec = OBJECT_ACTIONS.get(action)
        if spec is None:
            raise Http404(gettext("No action %(action)r.") % {"action": action})
        obj = self._viewable(request, object_id)
        allowed: Callable[[HttpRequest], bool] = getattr(self, f"has_{spec.permission}_permission")
        if not allowed(request):
            raise PermissionDenied
        one = self.get_queryset(request).filter(pk=obj.pk)
        if action == "cancel":
            self._cancel(request, one)
        elif action == "resume":
            self._resume(request, one)
        else:
            new_ids = self._retry(request, one)
            if new_ids:
                return HttpResponseRedirect(self._url("change", quote(new_ids[0])))
        return HttpResponseRedirect(self._url("change", quote(obj.pk)))

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Workflow | None = None,
    ) -> HttpResponse:
        if obj is not None:
            context.update(self.workflow_context(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _details(self, obj: Workflow) -> dict[str, Detail | None]:
        """The inputs, output and error of ``obj``: at most DETAIL_CHARS + 1 of each."""
        annotations: dict[str, Any] = {}
        for name in JSON_FIELDS:
            annotations[f"{name}_head"] = Substr(name, 1, DETAIL_CHARS + 1)
            annotations[f"{name}_size"] = Length(name)
        row = (
            Workflow.objects.using(alias())
            .filter(pk=obj.pk)
            .annotate(**annotations)
            .values(*annotations)
            .first()
        ) or {}
        return {
            name: Detail.of(
                row.get(f"{name}_head"),
                row.get(f"{name}_size"),
                self._url("json", quote(obj.pk), name),
            )
            for name in JSON_FIELDS
        }

    def json_view(self, request: HttpRequest, object_id: str, field: str) -> HttpResponse:
        """One JSON column of a workflow, whole, as stored: what its page shows cut."""
        if field not in JSON_FIELDS:
            raise Http404(gettext("No field %(field)r.") % {"field": field})
        obj = self._viewable(request, object_id)
        text = (
            Workflow.objects.using(alias()).filter(pk=obj.pk).values_list(field, flat=True).first()
        )
        if text is None:
            raise Http404(gettext("This workflow has no %(field)s.") % {"field": field})
        response = HttpResponse(text, content_type="application/json; charset=utf-8")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", obj.pk)[:100]
        response["Content-Disposition"] = f'attachment; filename="{name}-{field}.json"'
        return response

    def workflow_context(self, request: HttpRequest, obj: Workflow) -> dict[str, Any]:
        using = alias()
        details = self._details(obj)
        mark_unknown_workflows([obj], using)
        error = details["error"]
        steps = list(
            Step.objects.using(using)
            .filter(workflow_id=obj.pk)
            .order_by("operation")
            .defer("output", "error")
            .annotate(
                output_head=Substr("output", 1, PREVIEW_CHARS + 1),
                error_head=Substr("error", 1, DETAIL_CHARS + 1),
            )[: PAGE_STEPS + 1]
        )
        more_steps = len(steps) > PAGE_STEPS
        streams = list(
            Stream.objects.using(using)
            .filter(workflow_id=obj.pk)
            .order_by("key")[: PAGE_STREAMS + 1]
        )
        more_streams = len(streams) > PAGE_STREAMS
        streams = streams[:PAGE_STREAMS]
        for stream in streams:
            stream.workflow = obj  # its state needs the workflow's status: no query each
        # Values are shown by their head only: a message or event may be large.
        sent = _value_heads(
            Message.objects.using(using).filter(destination_id=obj.pk).order_by("-id"),
            PAGE_MESSAGES,
        )
        events = _value_heads(
            Event.objects.using(using).filter(workflow_id=obj.pk).order_by("key"), PAGE_EVENTS
        )
        retries = list(
            Workflow.objects.using(using)
            .filter(retry_of_id=obj.pk)
            .order_by("-created_at")
            .only("pk", "status", "created_at")[:10]
        )
        actions = [
            {"spec": spec, "url": self._url("act", quote(obj.pk), spec.name)}
            for spec in OBJECT_ACTIONS.values()
            if obj.status in spec.applies_to
            and getattr(self, f"has_{spec.permission}_permission")(request)
        ]
        return {
            "title": obj.name,
            "subtitle": None,
            "workflow": obj,
            "status_badge": status_badge(obj.status),
            "created": format_time(obj.created_at),
            "started": format_time(obj.started_at),
            "finished": format_time(obj.finished_at),
            "lease_expires": format_time(obj.lease_expires_at),
            "duration": format_duration(obj.duration),
            "inputs": details["inputs"],
            "output": details["output"],
            "inputs_json": details["inputs"].text if details["inputs"] else None,
            "output_json": details["output"].text if details["output"] else None,
            # A record cut short is no JSON: its type, and its head as stored.
            "error": (
                None
                if error is None
                else {"type": error_type_of(error.text), "message": "", "traceback": ""}
                if error.cut
                else decode_error(error.text)  # indented, still the same JSON
            ),
            "error_detail": error,
            "steps": [StepRow.of(step) for step in steps[:PAGE_STEPS]],
            "steps_url": self._url("steps", quote(obj.pk)) if more_steps else None,
            "streams": self._stream_panels(streams),
            "more_streams": more_streams,
            "workflow_messages": [
                {
                    "topic": message.topic,
                    **_preview(message),
                    "received": message.consumed_operation is not None,
                    "operation": message.consumed_operation,
                    "sent": format_time(message.created_at),
                }
                for message in sent[:PAGE_MESSAGES]
            ],
            "more_workflow_messages": len(sent) > PAGE_MESSAGES,
            "workflow_events": [
                {"key": event.key, **_preview(event), "updated": format_time(event.updated_at)}
                for event in events[:PAGE_EVENTS]
            ],
            "more_workflow_events": len(events) > PAGE_EVENTS,
            "retry_of_url": (
                self._url("change", quote(obj.retry_of_id)) if obj.retry_of_id else None
            ),
            "retries": [
                {
                    "id": retry.pk,
                    "short_id": short_id(retry.pk),
                    "badge": status_badge(retry.status),
                    "url": self._url("change", quote(retry.pk)),
                }
                for retry in retries
            ],
            "object_actions": actions,
            "live_rows": LIVE_ROWS,
            "unknown_workflow": (
                {"title": UNKNOWN_WORKFLOW, "hint": UNKNOWN_WORKFLOW_HINT}
                if obj.unknown_workflow  # type: ignore[attr-defined]  # set just above
                else None
            ),
        }

    def _stream_panels(self, streams: list[Stream]) -> list[StreamPanel]:
        condition = Q()
        for stream in streams:
            condition |= Q(
                stream_id=stream.pk,
                offset__gte=max(stream.length - PAGE_TAIL, 0),
                offset__lt=stream.length,
            )
        tails: dict[int, list[EntryRow]] = {stream.pk: [] for stream in streams}
        if streams:
            entries = (
                StreamEntry.objects.using(alias())
                .filter(condition)
                .order_by("stream_id", "offset")
                .defer("value")
                .annotate(value_head=Substr("value", 1, PREVIEW_CHARS + 1))
            )
            for entry in entries:
                tails[entry.stream_id].append(EntryRow.preview(entry))
        return [StreamPanel(stream, tails[stream.pk]) for stream in streams]

    # Paginated history

    def _history_context(self, request: HttpRequest, obj: Workflow, title: str) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "title": title,
            "workflow": obj,
            "workflow_url": self._url("change", quote(obj.pk)),
            "status_badge": status_badge(obj.status),
            "media": self.media,
        }

    def schedules_view(self, request: HttpRequest) -> HttpResponse:
        """The scheduled workflows of this process: their cron, next tick and last run."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        rows = [
            {
                "name": found.name,
                "schedule": found.schedule,
                "queue": found.queue,
                "next_tick": "—" if found.next_tick is None else format_time(found.next_tick),
                "last_tick": None if found.last_tick is None else format_time(found.last_tick),
                "last_run_url": None
                if found.last_run is None
                else self._url("change", quote(found.last_run.workflow_id)),
                "last_run_id": None if found.last_run is None else found.last_run.workflow_id,
            }
            for found in list_schedules()
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": gettext("Schedules"),
            "schedules": rows,
        }
        return TemplateResponse(request, "admin/durable_streams/workflow/schedules.html", context)

    def steps_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self._viewable(request, object_id)
        steps = Step.objects.using(alias()).filter(workflow_id=obj.pk)
        total = steps.count()
        offset = offset_param(request, total)
        if isinstance(offset, HttpResponse):
            return offset
        page = list(
            steps.order_by("operation")
            .defer("output", "error")
            .annotate(
                output_head=Substr("output", 1, PREVIEW_CHARS + 1),
                error_head=Substr("error", 1, DETAIL_CHARS + 1),
            )[offset : offset + STEPS_PER_PAGE]
        )
        context = {
            **self._history_context(
                request, obj, gettext("Steps of %(name)s") % {"name": obj.name}
            ),
            "steps": [StepRow.of(step) for step in page],
            "pager": Pager(
                offset,
                STEPS_PER_PAGE,
                total,
                gettext("Steps %(first)s–%(last)s of %(total)s"),
                one_based=True,
            ),
        }
        return TemplateResponse(request, "admin/durable_streams/workflow/steps.html", context)

    def stream_view(self, request: HttpRequest, object_id: str, stream_id: int) -> HttpResponse:
        obj = self._viewable(request, object_id)
        stream = Stream.objects.using(alias()).filter(pk=stream_id, workflow_id=obj.pk).first()
        if stream is None:
            raise Http404(gettext("This workflow has no stream %(id)s.") % {"id": stream_id})
        stream.workflow = obj
        offset = offset_param(request, stream.length)
        if isinstance(offset, HttpResponse):
            return offset
        entries = (
            StreamEntry.objects.using(alias())
            .from_offset(stream.pk, offset, ENTRIES_PER_PAGE)
            .defer("value")
            .annotate(
                value_head=Substr("value", 1, VALUE_CHARS + 1),
                value_size=Length("value"),
            )
        )
        context = {
            **self._history_context(
                request,
                obj,
                gettext("Stream %(key)s of %(name)s") % {"key": stream.key, "name": obj.name},
            ),
            "stream": stream,
            "entries": [EntryRow.full(entry) for entry in entries],
            "pager": Pager(
                offset,
                ENTRIES_PER_PAGE,
                stream.length,
                gettext("Offsets %(first)s–%(last)s of %(total)s"),
                jump=True,
            ),
        }
        return TemplateResponse(
            request, "admin/durable_streams/workflow/stream_entries.html", context
        )


def _preview(row: Message | Event) -> dict[str, Any]:
    # value_head: annotated by the page's queryset.
    value, cut = clip(row.value_head, PREVIEW_CHARS)  # type: ignore[union-attr]
    return {"value": value, "value_cut": cut}
