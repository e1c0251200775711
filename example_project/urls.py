from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    # Server-Sent Events, for clients without WebSockets (curl, say).
    path("durable-streams/", include("durable_streams.urls")),
    path("", include("example_project.demo.urls")),
]
