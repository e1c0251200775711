"""Live feeds hear the same doorbells as Python waiters: the local hub, and through it
the database's notifications, wake them without polling."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from durable_streams.backends import backend_for
from durable_streams.bus import watched_topics
from tests import workflows
from tests.processes import worker_processes
from tests.sockets import (
    READER_FIXTURES,
    entries,
    no_polling,
    open_gate,
    open_socket,
    path,
    read_until_closed,
    start,
)
from tests.test_sse import decoded, get, url
from tests.waiting import wait_until_async
from tests.workflows_readers import paced

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120), READER_FIXTURES]

# Far below the 30 s polls of no_polling: a value that arrives within this was woken.
WAKE_WITHIN = 8.0


async def test_a_local_commit_wakes_a_feed_without_a_channel_layer(
    settings: Any, live_worker: Any
) -> None:
    settings.CHANNEL_LAYERS = {}  # nothing but the local hub carries the news
    no_polling(settings)
    wid = await start(paced, "out", ["a", "b", "c"], "gate-doorbell", 0.05)
    before = watched_topics()
    communicator = await open_socket(path(wid, "out"))
    # The feed rings on its stream's topic and its workflow's: subscribed, idle.
    await wait_until_async(lambda: watched_topics() >= before + 2, timeout=10)
    started = time.monotonic()
    await open_gate("gate-doorbell")
    frames, code = await read_until_closed(communicator, timeout=WAKE_WITHIN)
    assert entries(frames) == [(0, "a"), (1, "b"), (2, "c")]
    assert frames[-1]["type"] == "closed" and code == 1000
    assert time.monotonic() - started < WAKE_WITHIN


@pytest.mark.postgres
async def test_notifications_from_a_worker_process_wake_feeds_without_redis(
    settings: Any, tmp_path: Path
) -> None:
    if not backend_for("default").notifies:
        pytest.skip("needs a database with notifications (PostgreSQL)")
    # A layer that reaches no other process: only LISTEN/NOTIFY brings the worker's news.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    no_polling(settings)
    count = 6
    with worker_processes(tmp_path) as workers:
        workers.start(
            "doorbell-worker",
            # No Redis in the worker either, and no fast polls to hide behind.
            env_overrides={"REDIS_URL": "", "DS_POLL_INTERVAL": "30"},
        )
        wid = await start(workflows.steady, count, 0.3)
        socket = await open_socket(path(wid, "out"))
        events = await get(url(wid, "out"))
        frames, code = await read_until_closed(socket, timeout=WAKE_WITHIN + count * 0.3)
        assert entries(frames) == [(i, i) for i in range(count)], workers.logs()
        assert frames[-1]["type"] == "closed" and code == 1000
        sse = await events.until_closed(timeout=WAKE_WITHIN)
        values = [(e["offset"], e["value"]) for e in decoded(sse) if e["type"] == "entry"]
        assert values == [(i, i) for i in range(count)]
    assert connection.vendor == "postgresql"
