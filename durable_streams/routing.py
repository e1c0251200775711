"""WebSocket routes; include them in the project's ``URLRouter``::

from durable_streams.routing import websocket_urlpatterns

application = ProtocolTypeRouter({
    "http": get_asgi_application(),
    "websocket": AllowedHostsOriginValidator(
        AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
    ),
})
"""

from __future__ import annotations

from django.urls import re_path

from .consumers import StreamConsumer

# The key is the rest of the path, so a key may hold "/" (percent-encoded by clients).
websocket_urlpatterns = [
    re_path(
        r"^ws/durable-streams/(?P<workflow_id>[^/]+)/(?P<key>.+)/$",
        StreamConsumer.as_asgi(),
        name="durable_streams_ws",
    ),
]
