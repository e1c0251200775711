"""A stream as Server-Sent Events over plain HTTP, for clients without WebSockets.

``GET <prefix>/<workflow_id>/<key>/events[?offset=N]`` answers ``text/event-stream``::

    id: N
    event: entry
    data: {"type": "entry", "key": K, "offset": N, "value": V}

for each value, then ``event: closed`` with ``{"type": "closed", "key": K, "length": L}``
and the end of the response. The ``id`` is the offset: a client that reconnects
with ``Last-Event-ID: N`` resumes at ``N + 1``. Refusals are plain HTTP answers:
400 (bad offset or key), 403 (not allowed), 404 (no such workflow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseForbidden,
    HttpResponseNotFound,
    StreamingHttpResponse,
)
from django.views.decorators.http import require_GET

from . import delivery
from .delivery import BadParameters, parse_address, parse_offset

logger = logging.getLogger("durable_streams.views")

# Seconds of silence after which a comment line keeps proxies from closing the response.
KEEPALIVE_SECONDS = 15.0
RETRY_MILLISECONDS = 1000


def _start_offset(request: HttpRequest) -> int:
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id is not None:
        return parse_offset(last_event_id.strip(), "Last-Event-ID") + 1
    # As on the socket: which of two offsets was meant is anyone's guess.
    offsets = request.GET.getlist("offset")
    if len(offsets) > 1:
        raise BadParameters("Give offset once.")
    return parse_offset(offsets[0] if offsets else None)


def _plain(response_class: type[HttpResponse], message: str) -> HttpResponse:
    return response_class(message + "\n", content_type="text/plain; charset=utf-8")


@require_GET
async def stream_events(request: HttpRequest, workflow_id: str, key: str) -> HttpResponse:
    try:
        workflow_id, key = parse_address(workflow_id, key)
        offset = _start_offset(request)
    except BadParameters as exc:
        return _plain(HttpResponseBadRequest, str(exc))
    user = await request.auser()
    refusal = await delivery.run_db(delivery.may_read, user, workflow_id, key)
    if refusal == delivery.NOT_FOUND:
        return _plain(HttpResponseNotFound, "No such workflow.")
    if refusal == delivery.FORBIDDEN:
        return _plain(HttpResponseForbidden, "You may not read this stream.")
    feed = delivery.StreamFeed(workflow_id, key, offset)
    response = StreamingHttpResponse(_event_stream(feed), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    # Tell nginx and its kind not to buffer the events.
    response["X-Accel-Buffering"] = "no"
    return response


async def _event_stream(feed: delivery.StreamFeed) -> AsyncIterator[bytes]:
    # The feed subscribes itself through this process's one subscription per stream.
    out: asyncio.Queue[delivery.Entry | delivery.Closed | BaseException] = asyncio.Queue()
    pump: asyncio.Task[None] | None = None
    try:
        yield f"retry: {RETRY_MILLISECONDS}\n\n".encode()
        pump = asyncio.create_task(_pump(feed, out))
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    item = await out.get()
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if isinstance(item, delivery.Entry):
                frame = item.frame or delivery.entry_frame(feed.key, item.offset, item.text)
                yield f"id: {item.offset}\nevent: entry\ndata: {frame}\n\n".encode()
            elif isinstance(item, delivery.Closed):
                frame = delivery.closed_frame(feed.key, item.length)
                yield f"event: closed\ndata: {frame}\n\n".encode()
                return
            else:
                logger.error(
                    "Stream %r of workflow %r failed.", feed.key, feed.workflow_id, exc_info=item
                )
                return
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump


async def _pump(
    feed: delivery.StreamFeed,
    out: asyncio.Queue[delivery.Entry | delivery.Closed | BaseException],
) -> None:
    try:
        async with contextlib.aclosing(feed.events()) as events:
            async for event in events:
                out.put_nowait(event)
    except Exception as exc:
        out.put_nowait(exc)
