"""The ASGI server of items 3 and 4: stream sockets only, counting its database queries.

The count (every statement this process sends) is written to ``BENCH_QUERY_COUNT_FILE``
every half second, so the fan-out workload can tell queries per value, not per client.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

from django.core.asgi import get_asgi_application

django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.db.backends import utils  # noqa: E402

from durable_streams.routing import websocket_urlpatterns  # noqa: E402

_queries = 0
_lock = threading.Lock()
_execute = utils.CursorWrapper._execute


def _counting_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
    global _queries
    with _lock:
        _queries += 1
    return _execute(self, *args, **kwargs)


def _report(path: str) -> None:
    # Bounded: the server lives for one workload.
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        with open(path + ".tmp", "w") as out:
            out.write(str(_queries))
        os.replace(path + ".tmp", path)
        time.sleep(0.5)


if os.environ.get("BENCH_QUERY_COUNT_FILE"):
    utils.CursorWrapper._execute = _counting_execute  # type: ignore[method-assign]
    threading.Thread(
        target=_report, args=(os.environ["BENCH_QUERY_COUNT_FILE"],), daemon=True
    ).start()

application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
    }
)
