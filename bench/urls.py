from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # Item 9 reads a stream as Server-Sent Events too.
    path("durable-streams/", include("durable_streams.urls")),
]
