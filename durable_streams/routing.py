"""WebSocket routes; include them in the project's ``URLRouter``::

from durable_streams.routing import websocket_urlpatterns

application = ProtocolTypeRouter({
    "http": get_asgi_application(),
    "websocket": AllowedHostsOriginValidator(
        AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
    ),
})

Every path under ``ws/durable-streams/`` is answered here: a stream's address
(``<workflow_id>/<key>/``, the trailing slash optional) is served, and anything else
under the prefix is accepted and closed with 4400 and a reason. Paths outside the
prefix are the project's own router's business: Channels' ``URLRouter`` raises
``ValueError`` for a path that no route matches, which servers log as an error and
answer with a failed handshake, so a project that wants those refused quietly adds
its own catch-all route last.
"""

from __future__ import annotations

from django.urls import re_path

from .web.consumers import BadAddressConsumer, StreamConsumer

# The key is the rest of the path, so a key may hold "/" (percent-encoded by clients).
# A key that ends in "/" needs the trailing slash; without it the last "/" is taken for it.
websocket_urlpatterns = [
    re_path(
        r"^ws/durable-streams/(?P<workflow_id>[^/]+)/(?P<key>.+?)/?$",
        StreamConsumer.as_asgi(),
        name="durable_streams_ws",
    ),
    re_path(r"^ws/durable-streams(?:/|$)", BadAddressConsumer.as_asgi()),
]
