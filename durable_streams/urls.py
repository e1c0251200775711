"""HTTP routes: ``path("durable-streams/", include("durable_streams.urls"))``."""

from __future__ import annotations

from django.urls import path

from .web import views

app_name = "durable_streams"

urlpatterns = [
    # The key is the rest of the path before /events, so a key may hold "/".
    path("<str:workflow_id>/<path:key>/events", views.stream_events, name="events"),
]
