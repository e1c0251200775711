"""The DBOS twins of ``bench/workflows.py``, and how the benchmark launches DBOS.

Everything here goes through DBOS's public API (``DBOS.workflow``, ``DBOS.step``,
``DBOS.write_stream``, ``DBOS.read_stream``, ``DBOS.register_queue``, ``DBOSClient``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from dbos import DBOS, DBOSClient, DBOSConfig

APP_NAME = "bench"
QUEUE = "bench"


def database_url() -> str:
    base = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
    return f"{base.rstrip('/')}/{os.environ.get('BENCH_DBOS_DB_NAME', 'dbos_bench')}"


def launch(
    *,
    worker_concurrency: int | None = None,
    executor_id: str | None = None,
    coalesce: float | None = None,
    queue_polling: float = 0.05,
) -> None:
    """Launch DBOS in this process; with ``worker_concurrency``, also run the bench queue."""
    config: DBOSConfig = {
        "name": APP_NAME,
        "system_database_url": database_url(),
        "log_level": "WARNING",
        # A fixed version, so every process runs (and recovers) the same workflows.
        "application_version": "bench",
    }
    if executor_id is not None:
        config["executor_id"] = executor_id
    if coalesce is not None:
        config["notification_coalesce_sec"] = coalesce
    DBOS(config=config)
    if worker_concurrency is None:
        DBOS.listen_queues([])
    DBOS.launch()
    if worker_concurrency is not None:
        # The default polling interval is 1 s; 50 ms is DBOS's quick-pickup setting.
        DBOS.register_queue(
            QUEUE,
            worker_concurrency=worker_concurrency,
            polling_interval_sec=queue_polling,
            on_conflict="always_update",
        )


def client(listen: bool = False) -> DBOSClient:
    return DBOSClient(
        system_database_url=database_url(), application_name=APP_NAME, use_listen_notify=listen
    )


def enqueue(dbos_client: DBOSClient, name: str, *args: Any) -> str:
    handle = dbos_client.enqueue({"workflow_name": name, "queue_name": QUEUE}, *args)
    return handle.get_workflow_id()


@DBOS.workflow(name="bench.noop")
def noop() -> str:
    return "ok"


@DBOS.workflow(name="bench.append")
def append(count: int) -> float:
    started = time.time()
    DBOS.write_stream("out", {"i": 0, "t": started})
    for i in range(1, count):
        DBOS.write_stream("out", {"i": i})
    DBOS.close_stream("out")
    return started


@DBOS.step(name="bench.wait_for_file")
def wait_for_file(path: str, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.005)
    return False


@DBOS.workflow(name="bench.ticker")
def ticker(count: int, interval: float, go_path: str) -> int:
    DBOS.write_stream("t", {"i": -1})
    if not wait_for_file(go_path, 60.0):
        raise RuntimeError(f"the reader never created {go_path}")
    due = time.monotonic()
    for i in range(count):
        DBOS.write_stream("t", {"i": i, "t": time.time()})
        due += interval
        time.sleep(max(due - time.monotonic(), 0.0))
    DBOS.close_stream("t")
    return count


@DBOS.step(name="bench.emit")
def emit(j: int) -> int:
    DBOS.write_stream("out", j)
    return j


@DBOS.workflow(name="bench.three_steps")
def three_steps(i: int) -> int:
    for j in range(3):
        emit(j)
    return i


@DBOS.step(name="bench.square")
def square(i: int) -> int:
    return i * i


@DBOS.workflow(name="bench.many_steps")
def many_steps(count: int) -> dict[str, Any]:
    started = time.time()
    for i in range(count):
        square(i)
    return {"count": count, "seconds": time.time() - started}


@DBOS.step(name="bench.nap")
def nap(seconds: float) -> None:
    time.sleep(seconds)


@DBOS.workflow(name="bench.slow_writer")
def slow_writer(count: int, delay: float) -> int:
    for i in range(count):
        nap(delay)
        DBOS.write_stream("out", i)
    DBOS.close_stream("out")
    return count


@DBOS.workflow(name="bench.fill_seed")
def fill_seed() -> int:
    """Writes offset 0 and the close; the benchmark inserts the values in between."""
    DBOS.write_stream("out", {"i": 0})
    DBOS.close_stream("out")
    return 1
