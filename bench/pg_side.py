"""What this PostgreSQL server does on its own, as peers of the durable_streams figures.

``python -m bench.pg_side commit-rate --seconds 3``: one connection in autocommit
mode inserts one small row per statement, so every row costs a commit (and its WAL
flush), for a bounded count and time.

``python -m bench.pg_side notify-latency --count 300``: the floor under write-to-reader
latency. One process inserts a row, sends ``pg_notify`` with its wall-clock time and
commits, every 10 ms; a listener in another process takes the time it hears it.
Raw psycopg, no framework: what any library on this server and machine pays.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from typing import Any

import psycopg

from bench.common import BenchError, emit_result, percentile


def database_url() -> str:
    base = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
    return f"{base.rstrip('/')}/{os.environ.get('BENCH_DS_DB_NAME', 'ds_bench')}"


def commit_rate(args: argparse.Namespace) -> None:
    with psycopg.connect(database_url(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_commit_rate")
        conn.execute("CREATE TABLE bench_commit_rate (id bigserial PRIMARY KEY, value text)")
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                [["synchronous_commit", "fsync", "wal_sync_method", "commit_delay"]],
            ).fetchall()
        )
        rows = 0
        started = time.perf_counter()
        deadline = started + args.seconds
        while rows < args.max_rows and time.perf_counter() < deadline:
            conn.execute("INSERT INTO bench_commit_rate (value) VALUES (%s)", ['{"i":1}'])
            rows += 1
        seconds = time.perf_counter() - started
        conn.execute("DROP TABLE bench_commit_rate")
    emit_result({"rows": rows, "seconds": seconds, "commits_per_s": rows / seconds, **settings})


def _listen(channel: str, count: int, ready: Any, results: Any) -> None:
    latencies = []
    with psycopg.connect(database_url(), autocommit=True) as conn:
        conn.execute(f"LISTEN {channel}")
        ready.set()
        for note in conn.notifies(timeout=60, stop_after=count):
            latencies.append((time.time() - float(note.payload)) * 1000.0)
    results.put(latencies)


def notify_latency(args: argparse.Namespace) -> None:
    channel = f"bench_floor_{os.getpid()}"
    ready = multiprocessing.Event()
    results: Any = multiprocessing.Queue()
    listener = multiprocessing.Process(target=_listen, args=(channel, args.count, ready, results))
    listener.start()
    try:
        if not ready.wait(30):
            raise BenchError("the listener did not start")
        with psycopg.connect(database_url()) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_floor (id bigserial PRIMARY KEY, v text)"
            )
            conn.commit()
            for _ in range(args.count):
                conn.execute("INSERT INTO bench_floor (v) VALUES (%s)", ['{"i":1}'])
                conn.execute("SELECT pg_notify(%s, %s)", [channel, repr(time.time())])
                conn.commit()
                time.sleep(args.interval)
            latencies = results.get(timeout=60)
            conn.execute("DROP TABLE bench_floor")
            conn.commit()
    finally:
        listener.join(10)
        if listener.is_alive():
            listener.kill()
    if len(latencies) != args.count:
        raise BenchError(f"heard {len(latencies)} notifications of {args.count}")
    emit_result(
        {
            "count": len(latencies),
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_side")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("commit-rate")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--max-rows", type=int, default=200_000)
    p.set_defaults(func=commit_rate)
    p = sub.add_parser("notify-latency")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--interval", type=float, default=0.01)
    p.set_defaults(func=notify_latency)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
