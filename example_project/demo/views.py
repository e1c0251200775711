"""Ask a question, watch the answer being written, come back to it later."""

from __future__ import annotations

from typing import Any

from django import forms
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods

from durable_streams import StreamTimeout, WorkflowCancelled, WorkflowFailed, read_stream
from durable_streams.auth import VIEW_PERMISSIONS, can_read
from durable_streams.conf import get_config
from durable_streams.models import Workflow

from .workflows import ANSWER, PROGRESS, answer

RECENT_RUNS = 12
SUGGESTIONS = [
    "How do I make a long job survive a server restart?",
    "Explain exactly-once delivery to a new teammate.",
    "What should a progress bar really measure?",
]


class AskForm(forms.Form):
    prompt = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "Ask anything…"}),
    )
    private = forms.BooleanField(
        required=False, initial=True, label="Only me (and admins) can read the answer"
    )


def visible_runs(user: Any) -> QuerySet[Workflow]:
    """The demo's runs this user may read: public ones, their own, or all for admins."""
    runs = Workflow.objects.filter(name=answer.name).select_related("owner")
    if any(user.has_perm(name) for name in VIEW_PERMISSIONS):
        return runs
    if user.is_authenticated:
        return runs.filter(Q(is_public=True) | Q(owner=user))
    return runs.filter(is_public=True)


def prompt_of(run: Workflow) -> str:
    args = run.decoded_inputs.get("args") or [""]
    return str(args[0])


def stored(workflow_id: str, key: str) -> list[Any]:
    """What the stream holds now, without waiting for more."""
    values: list[Any] = []
    try:
        for value in read_stream(workflow_id, key, timeout=0):
            values.append(value)
    except StreamTimeout:
        pass  # open: the page's socket takes it from here
    except (WorkflowCancelled, WorkflowFailed):
        pass  # interrupted: the page shows what was written, its socket says why
    return values


def recent(user: Any) -> list[dict[str, Any]]:
    return [{"run": run, "prompt": prompt_of(run)} for run in visible_runs(user)[:RECENT_RUNS]]


@require_http_methods(["GET", "POST"])
def index(request: HttpRequest) -> HttpResponse:
    form = AskForm(request.POST or None)
    form.fields["prompt"].widget.attrs["autofocus"] = True
    if request.method == "POST" and form.is_valid():
        prompt = form.cleaned_data["prompt"]
        if request.user.is_authenticated:
            # The owner may read the streams; "public" opens them to everyone.
            public = not form.cleaned_data["private"]
            handle = answer.using(owner=request.user, public=public).start(prompt)
        else:
            # A visitor has no account to own the run: anyone with the link may read it.
            handle = answer.using(public=True).start(prompt)
        return redirect("demo:run", workflow_id=handle.workflow_id)
    context = {"form": form, "recent": recent(request.user), "suggestions": SUGGESTIONS}
    return render(request, "demo/index.html", context)


def run(request: HttpRequest, workflow_id: str) -> HttpResponse:
    workflow = get_object_or_404(Workflow, pk=workflow_id, name=answer.name)
    if not can_read(request.user, workflow, ANSWER):
        # Answered like a missing run, as the stream endpoints do: ids cannot be probed.
        raise Http404("No such answer, or you may not read it.")
    tokens = stored(workflow_id, ANSWER)
    progress = stored(workflow_id, PROGRESS)
    context = {
        "workflow": workflow,
        "prompt": prompt_of(workflow),
        # The page shows what is stored; its sockets ask only for what comes next.
        "text": "".join(tokens),
        "answer_offset": len(tokens),
        "progress": progress[-1] if progress else None,
        "progress_offset": len(progress),
        # The page's client counts silence in the server's heartbeats.
        "heartbeat_ms": round(get_config().READER_HEARTBEAT_SECONDS * 1000),
        "form": AskForm(),
        "recent": recent(request.user),
    }
    return render(request, "demo/run.html", context)
