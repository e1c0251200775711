"""A stream as Server-Sent Events over plain HTTP, for clients without WebSockets.

``GET <prefix>/<workflow_id>/<key>/events[?offset=N]`` answers ``text/event-stream``::

    id: N
    event: entry
    data: {"type": "entry", "key": K, "offset": N, "value": V}

for each value, then ``event: closed`` with ``{"type": "closed", "key": K, "length": L}``
and the end of the response. A stream that its workflow's failure or cancellation
ended is not closed: ``event: interrupted`` with ``{"type": "interrupted", "key": K,
"length": L, "status": "CANCELLED" | "ERROR"}``, and the response stays open, so
that the values of a resumed run, then ``event: closed``, follow. The ``id`` is the
offset: a client that reconnects with ``Last-Event-ID: N`` resumes at ``N + 1``.
After ``READER_HEARTBEAT_SECONDS`` without an event the server sends a comment
line (``: keep-alive``), which keeps proxies from closing a quiet response; clients
that read the response themselves can take it as a sign of life (EventSource does
not report comments). Refusals are plain HTTP answers: 400 (bad offset or key),
404 (no such workflow, or the user may not read it: the same answer, so that nobody
can probe which ids exist).

Access is checked again every ``REAUTHORIZE_SECONDS`` while the response lasts; once
it no longer holds, ``event: refused`` with ``{"type": "refused", "key": K, "reason": R}``
ends the response (an EventSource reconnects, and gets the 404).

An open response holds no thread and no database connection of its own: the user is
read, and the reader authorized, in ``run_db``, and the request's own thread
goes once the response has started (``_release_request_thread``).

A request that came through WSGI is refused with 501: a WSGI server would collect the
whole (possibly endless) stream before sending its first byte, so the events need an
ASGI server.

EventSource cannot acknowledge what it has read, and some ASGI servers (daphne) buffer
whatever the application sends, however slow the client. So one response carries at
most ``READER_WINDOW_BYTES`` of entries (at least one entry): then it sends
``retry: 100`` and ends, without ``event: closed``, and the browser reconnects
with ``Last-Event-ID`` and resumes at the next offset. Between the feed and the
response, one event at a time is handed over: where the server waits for the client
to read (uvicorn), the feed waits too, and reads nothing from the database meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from asgiref.sync import SyncToAsync
from django.core.handlers.asgi import ASGIRequest
from django.db import connections
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseNotFound,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_GET

from .. import telemetry
from ..auth import ReaderAccess, may_read
from ..conf import get_config
from . import protocol
from .feed import Closed, Entry, Interrupted, Revoked, StreamFeed, run_db
from .protocol import BadParameters, parse_address, parse_offset

logger = logging.getLogger("durable_streams.views")

RETRY_MILLISECONDS = 1000
# The reconnection delay sent when a response ends early because of its byte budget.
BUDGET_RETRY_MILLISECONDS = 100


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


def _asgi_only(
    view: Callable[..., Coroutine[Any, Any, HttpResponseBase]],
) -> Callable[..., Coroutine[Any, Any, HttpResponseBase]]:
    """Refuse (501) requests that came through WSGI.

    Django serves an async iterator under WSGI by collecting all of it first: an open
    stream would send nothing until it closed, and a long one would sit in memory.
    """

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not isinstance(request, ASGIRequest):
            return HttpResponse(
                "Server-Sent Events need an ASGI server (daphne or uvicorn, for example); "
                "this request came through WSGI.\n",
                status=501,
                content_type="text/plain; charset=utf-8",
            )
        return await view(request, *args, **kwargs)

    return wrapper


@require_GET
@_asgi_only
async def stream_events(request: HttpRequest, workflow_id: str, key: str) -> HttpResponseBase:
    try:
        workflow_id, key = parse_address(workflow_id, key)
        offset = _start_offset(request)
    except BadParameters as exc:
        return _plain(HttpResponseBadRequest, str(exc))
    # Not request.auser(): it would read the session in the request's own thread.
    access = await run_db(_authorize, request, workflow_id, key)
    if access is None:
        return _plain(HttpResponseNotFound, protocol.NOT_FOUND_REASON)
    feed = StreamFeed(workflow_id, key, offset, access)
    response = StreamingHttpResponse(_event_stream(feed), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    # Tell nginx and its kind not to buffer the events.
    response["X-Accel-Buffering"] = "no"
    return response


def _authorize(request: HttpRequest, workflow_id: str, key: str) -> ReaderAccess | None:
    """The reader's access, or None if it may not read the stream (blocking)."""
    user: Any = getattr(request, "user", None)
    if user is not None:
        user.is_authenticated  # noqa: B018 (resolves the lazy user in this thread)
    if not may_read(user, workflow_id, key):
        return None
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    return ReaderAccess(user, session_key, workflow_id, key)


async def _release_request_thread() -> None:
    """Let the request's own thread go, with its database connections.

    Django's ASGIHandler serves each request in an asgiref ThreadSensitiveContext:
    its sync parts (sync middleware, thread-sensitive sync_to_async) run in a
    one-thread executor of that context, which is shut down only when the context
    exits, after the last byte of the response, and whose connections are closed
    only at request_finished. An event stream lasts as long as its reader, so each
    would hold a thread and a connection. By now the response has started: the view
    and the middleware have returned, so nothing is running in that thread or will
    be queued for it. Its connections are closed there, and the executor is taken
    out of the context's map and shut down without waiting. A later thread-sensitive
    call in this request (response.close() sends request_finished) finds no executor
    and gets a new one, which the context shuts down at its exit.
    """
    context = SyncToAsync.thread_sensitive_context.get(None)
    # No context: not under ASGIHandler. An executor given to the context (newer
    # asgiref lets a caller pass one) belongs to that caller, not to this request.
    if context is None or getattr(context, "_executor", None) is not None:
        return
    executor = SyncToAsync.context_to_thread_executor.pop(context, None)
    if executor is None:  # nothing ran in a thread of this request
        return
    closed = executor.submit(connections.close_all)
    executor.shutdown(wait=False)
    try:
        await asyncio.wrap_future(closed)
    except Exception:
        logger.warning("Could not close the request thread's connections.", exc_info=True)


async def _event_stream(feed: StreamFeed) -> AsyncIterator[bytes]:
    # The feed subscribes itself through this process's one subscription per stream.
    # One event in hand at a time: the feed is pulled only as fast as the client reads.
    out: asyncio.Queue[Entry | Closed | Interrupted | Revoked | BaseException] = asyncio.Queue(1)
    pump: asyncio.Task[None] | None = None
    config = get_config()
    budget = config.READER_WINDOW_BYTES
    # After this long without an event, a comment keeps proxies from closing the response.
    keepalive = config.READER_HEARTBEAT_SECONDS
    try:
        await _release_request_thread()
        yield f"retry: {RETRY_MILLISECONDS}\n\n".encode()
        pump = asyncio.create_task(_pump(feed, out))
        telemetry.reader_connected("sse")
        while True:
            try:
                async with asyncio.timeout(keepalive):
                    item = await out.get()
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if isinstance(item, Entry):
                frame = item.frame or protocol.entry_frame(feed.key, item.offset, item.text)
                event = f"id: {item.offset}\nevent: entry\ndata: {frame}\n\n".encode()
                yield event
                budget -= len(event)
                if budget <= 0:
                    # EventSource reconnects with Last-Event-ID and resumes after this one.
                    yield (
                        ": this response is full; reconnect with Last-Event-ID\n"
                        f"retry: {BUDGET_RETRY_MILLISECONDS}\n\n"
                    ).encode()
                    return
            elif isinstance(item, Closed):
                frame = protocol.closed_frame(feed.key, item.length)
                yield f"event: closed\ndata: {frame}\n\n".encode()
                return
            elif isinstance(item, Interrupted):
                # Not an end: the response follows a resume (within its byte budget).
                frame = protocol.interrupted_frame(feed.key, item.length, item.status)
                yield f"event: interrupted\ndata: {frame}\n\n".encode()
            elif isinstance(item, Revoked):
                yield f"event: refused\ndata: {protocol.refused_frame(feed.key)}\n\n".encode()
                return
            else:
                logger.error(
                    "Stream %r of workflow %r failed.", feed.key, feed.workflow_id, exc_info=item
                )
                return
    finally:
        if pump is not None:
            telemetry.reader_disconnected("sse")
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump


async def _pump(
    feed: StreamFeed,
    out: asyncio.Queue[Entry | Closed | Interrupted | Revoked | BaseException],
) -> None:
    try:
        async with contextlib.aclosing(feed.events()) as events:
            async for event in events:
                await out.put(event)
    except Exception as exc:
        await out.put(exc)
