from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from django.db import connection

from durable_streams.worker import Worker


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
    from durable_streams.notify import stop_listeners
    from durable_streams.writer import release_connections

    stop_listeners()
    release_connections()
