"""WebSocket and SSE readers ride out a failing database read, like ``read_stream``."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import OperationalError

from durable_streams.web import feed as ds_feed
from tests.sockets import (
    READER_FIXTURES,
    entries,
    open_socket,
    path,
    read_until_closed,
    run_all,
    start,
)
from tests.workflows_readers import many

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]


def failing_reads(monkeypatch: pytest.MonkeyPatch, failures: int | None) -> list[int]:
    """Make the next ``failures`` stream reads (every one, with None) fail as a lost
    database would; return the offsets of the reads that were tried."""
    tried: list[int] = []
    read_batch = ds_feed.read_batch

    def flaky(workflow_id: str, key: str, offset: int) -> ds_feed.Batch:
        tried.append(offset)
        if failures is None or len(tried) <= failures:
            raise OperationalError("server closed the connection unexpectedly")
        return read_batch(workflow_id, key, offset)

    monkeypatch.setattr(ds_feed, "read_batch", flaky)
    return tried


async def test_a_socket_reads_again_after_failed_reads(
    run_burst: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wid = await start(many, "out", 5)
    await run_all(run_burst)
    tried = failing_reads(monkeypatch, failures=3)
    communicator = await open_socket(path(wid, "out"))
    frames, code = await read_until_closed(communicator)
    assert code == 1000
    assert entries(frames) == [(i, {"i": i, "text": f"value {i}"}) for i in range(5)]
    assert frames[-1] == {"type": "closed", "key": "out", "length": 5}
    assert tried[:4] == [0, 0, 0, 0]  # the same offset again, not a skip
    assert "reading again for up to" in caplog.text


async def test_a_socket_gives_up_after_reader_retry_seconds(
    run_burst: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "READER_RETRY_SECONDS": 0.5}
    wid = await start(many, "out", 2)
    await run_all(run_burst)
    tried = failing_reads(monkeypatch, failures=None)
    communicator = await open_socket(path(wid, "out"))
    frames, code = await read_until_closed(communicator, timeout=10)
    assert (frames, code) == ([], 1011)
    # Several tries, spaced out, within the half second.
    assert 2 <= len(tried) <= 8, tried


async def test_other_errors_are_not_retried(
    run_burst: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    wid = await start(many, "out", 1)
    await run_all(run_burst)
    calls: list[int] = []

    def broken(*args: Any) -> Any:
        calls.append(1)
        raise RuntimeError("a bug, not an outage")

    monkeypatch.setattr(ds_feed, "read_batch", broken)
    communicator = await open_socket(path(wid, "out"))
    frames, code = await read_until_closed(communicator, timeout=10)
    assert (frames, code, len(calls)) == ([], 1011, 1)
