"""Readers of a stream inside the test process: the WebSocket through the test suite's
ASGI application, the fixtures these tests share, and probes of the reads they cause.

A module whose ``pytestmark`` holds ``READER_FIXTURES`` has the two fixtures it names
apply to its tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

from durable_streams import start_workflow
from durable_streams.web import feed as ds_feed
from tests.asgi import application
from tests.models import Effect

# What every test of these readers needs (the fixtures are in conftest.py): Django's
# per-request thread connections closed, and a channel layer of its own.
READER_FIXTURES = pytest.mark.usefixtures("close_thread_connections", "channel_layer_per_test")


ORIGIN = (b"origin", b"http://testserver")


def path(workflow_id: str, key: str, query: str = "") -> str:
    return f"/ws/durable-streams/{workflow_id}/{key}/" + (f"?{query}" if query else "")


async def session_cookie(user: Any) -> tuple[bytes, bytes]:
    def login() -> str:
        client = Client()
        client.force_login(user)
        return client.cookies["sessionid"].value

    value = await sync_to_async(login)()
    return (b"cookie", f"sessionid={value}".encode())


async def make_user(username: str, **fields: Any) -> Any:
    return await sync_to_async(get_user_model().objects.create_user)(
        username, password="pw-" + username, **fields
    )


async def grant(user: Any, codename: str) -> Any:
    """``user`` with the permission ``durable_streams.<codename>``, read afresh."""

    def add() -> Any:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label="durable_streams", codename=codename)
        )
        return get_user_model().objects.get(pk=user.pk)

    return await sync_to_async(add)()


async def open_socket(
    url: str, *, user: Any = None, headers: list[tuple[bytes, bytes]] | None = None
) -> WebsocketCommunicator:
    sent = [ORIGIN] if headers is None else headers
    if user is not None:
        sent = [*sent, await session_cookie(user)]
    communicator = WebsocketCommunicator(application, url, headers=sent)
    connected, _ = await communicator.connect(timeout=10)
    assert connected, f"{url} refused the handshake"
    return communicator


async def read_until_closed(
    communicator: WebsocketCommunicator, timeout: float = 20.0
) -> tuple[list[dict[str, Any]], int]:
    """Every frame up to the server's close, and the close code."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no close within {timeout}s; got {frames[-3:]}"
        message = await communicator.receive_output(timeout=remaining)
        if message["type"] == "websocket.close":
            return frames, message.get("code", 1000)
        frames.append(json.loads(message["text"]))


async def read_entries(communicator: WebsocketCommunicator, count: int) -> list[dict[str, Any]]:
    frames = []
    for _ in range(count):
        frames.append(await communicator.receive_json_from(timeout=10))
    return frames


async def open_gate(label: str) -> None:
    await sync_to_async(Effect.objects.create)(workflow_id="", label=label)


async def start(wf: Any, *args: Any, **kwargs: Any) -> str:
    handle = await sync_to_async(start_workflow)(wf, *args, public=True, **kwargs)
    return handle.workflow_id


async def run_all(run_burst: Callable[..., Any], **options: Any) -> None:
    await sync_to_async(run_burst, thread_sensitive=False)(**options)


def entries(frames: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    return [(f["offset"], f["value"]) for f in frames if f["type"] == "entry"]


def no_polling(settings: Any) -> None:
    """Neither a silence poll nor a poll without a shared layer within the test: every
    value a socket gets came through the channel layer, or by gap detection."""
    settings.DURABLE_STREAMS = {
        **settings.DURABLE_STREAMS,
        "POLL_INTERVAL": 30.0,
        "NOTIFY_FALLBACK_POLL": 30.0,
    }


def record_reads(monkeypatch: pytest.MonkeyPatch, *, times: bool = False) -> list[Any]:
    """Every database read of a stream's values from now on, as it happens: its offset,
    or with ``times`` the event loop's clock when it happened."""
    seen: list[Any] = []
    read_batch = ds_feed.read_batch
    clock = asyncio.get_running_loop().time if times else None

    def counted(workflow_id: str, key: str, offset: int) -> ds_feed.Batch:
        seen.append(offset if clock is None else clock())
        return read_batch(workflow_id, key, offset)

    monkeypatch.setattr(ds_feed, "read_batch", counted)
    return seen
