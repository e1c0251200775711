from __future__ import annotations

import gc
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers
from django.db import connection, connections

from durable_streams.worker import Worker
from tests.processes import process_env
from tests.servers import Daphne


@pytest.fixture
async def close_thread_connections() -> AsyncIterator[None]:
    # sync_to_async() runs the test's database calls in a thread of its own, and Django
    # leaves the connections of its per-request threads to the garbage collector: close
    # them all, or PostgreSQL refuses to drop the test database at the end.
    yield
    await sync_to_async(connections.close_all)()
    gc.collect()


@pytest.fixture
def channel_layer_per_test() -> Iterator[None]:
    # Each test runs its own event loop; a Redis layer keeps loop-bound state, so every
    # test gets a layer of its own.
    channel_layers.backends = {}
    yield
    channel_layers.backends = {}


@pytest.fixture
def run_burst(transactional_db: None) -> Callable[..., Worker]:
    """Run a worker in this thread until no work is left."""

    def run(**options: object) -> Worker:
        worker = Worker(burst=True, **options)  # type: ignore[arg-type]
        worker.run()
        return worker

    return run


@pytest.fixture
def live_worker(transactional_db: None) -> Iterator[Worker]:
    """A worker running in a background thread for the duration of the test."""
    worker = Worker(concurrency=4, worker_id="live-worker")
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    yield worker
    worker.stop()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the test worker did not stop"


@pytest.fixture
def db_vendor() -> str:
    return connection.vendor


@pytest.fixture(scope="session", autouse=True)
def _stop_listeners_before_teardown(django_db_setup: None) -> Iterator[None]:
    # A LISTEN connection would keep the PostgreSQL test database from being dropped.
    yield
    from durable_streams.bus import stop_listeners
    from durable_streams.runtime.writer import release_connections

    stop_listeners()
    release_connections()


@pytest.fixture
def worker_thread(transactional_db: None) -> Iterator[Callable[..., Worker]]:
    """Start ``Worker(**options)`` in background threads; every one is stopped after the test."""
    started: list[tuple[Worker, threading.Thread]] = []

    def start(**options: object) -> Worker:
        worker = Worker(**options)  # type: ignore[arg-type]
        thread = threading.Thread(
            target=worker.run, name=f"test-worker-{len(started)}", daemon=True
        )
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, _ in started:
        worker.stop()
    for worker, thread in started:
        thread.join(timeout=30)
        assert not thread.is_alive(), f"worker {worker.worker_id} did not stop"


@pytest.fixture
async def async_db(transactional_db: None) -> AsyncIterator[None]:
    """Database access for async tests.

    ``sync_to_async`` runs queries in a thread of its own, whose connection would
    otherwise stay open and keep PostgreSQL from dropping the test database.
    """
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
def daphne(tmp_path: Path) -> Iterator[Any]:
    """Start ``daphne`` processes (``daphne(**env_changes)``); each is stopped after the test."""
    started: list[Daphne] = []

    def start(**env_changes: str | None) -> Daphne:
        server = Daphne(tmp_path / f"daphne-{len(started)}.log", process_env(**env_changes))
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
