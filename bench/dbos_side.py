"""The DBOS Transact side of each workload, one process per run.

``python -m bench.dbos_side <workload> [options]``; prints one ``BENCH_RESULT {json}``
line. Worker and reader processes are this module too.
"""

from __future__ import annotations

import argparse
import base64
import pickle
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench import dbos_app
from bench.common import (
    BenchError,
    Child,
    emit_ready,
    emit_result,
    percentile,
    stop_all,
    wait_until,
)

MODULE = "bench.dbos_side"
TERMINAL = ("SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")


def sql() -> psycopg.Connection[Any]:
    return psycopg.connect(dbos_app.database_url(), autocommit=True)


def cmd_setup(args: argparse.Namespace) -> None:
    """Create DBOS's schema in the (new, empty) database."""
    dbos_app.launch(worker_concurrency=1)
    from dbos import DBOS

    DBOS.destroy()
    emit_result({"ok": True})


def reset() -> None:
    with sql() as conn:
        conn.execute("TRUNCATE dbos.workflow_status CASCADE")


def cmd_worker(args: argparse.Namespace) -> None:
    dbos_app.launch(worker_concurrency=args.concurrency, executor_id=args.executor_id)
    emit_ready(args.executor_id or "")
    # Runs until SIGTERM (the default action ends the process) or SIGKILL.
    deadline = time.monotonic() + args.limit
    while time.monotonic() < deadline:
        time.sleep(0.5)


def start_worker(concurrency: int, executor_id: str | None = None) -> Child:
    child = Child(
        ["-m", MODULE, "worker", "--concurrency", str(concurrency)]
        + (["--executor-id", executor_id] if executor_id else [])
    )
    child.wait_ready()
    return child


def warm_up(client: Any, count: int = 1) -> None:
    ids = [dbos_app.enqueue(client, "bench.noop") for _ in range(count)]
    for workflow_id in ids:
        client.retrieve_workflow(workflow_id).get_result()


def cmd_read_ticks(args: argparse.Namespace) -> None:
    client = dbos_app.client(listen=True)
    go = Path(args.go)
    latencies: list[float] = []
    emit_ready()
    for value in client.read_stream(args.workflow_id, "t", timeout_seconds=60):
        now = time.time()
        if value["i"] < 0:
            go.touch()
            continue
        latencies.append((now - value["t"]) * 1000.0)
    client.destroy()
    emit_result({"latencies_ms": latencies})


def cmd_read_all(args: argparse.Namespace) -> None:
    client = dbos_app.client()
    started = time.perf_counter()
    count = 0
    for value in client.read_stream(args.workflow_id, "out", timeout_seconds=60):
        if value["i"] != count:
            raise BenchError(f"value {count} read as {value!r}")
        count += 1
    seconds = time.perf_counter() - started
    client.destroy()
    emit_result({"count": count, "seconds": seconds, "values_per_s": count / seconds})


def cmd_append(args: argparse.Namespace) -> None:
    reset()
    client = dbos_app.client(listen=True)
    worker = start_worker(1)
    try:
        warm_up(client)
        workflow_id = dbos_app.enqueue(client, "bench.append", args.count)
        count = 0
        for value in client.read_stream(workflow_id, "out", timeout_seconds=120):
            if count == 0:
                started = value["t"]
            count += 1
        readable = time.time()
        client.retrieve_workflow(workflow_id).get_result()
    finally:
        stop_all([worker])
        client.destroy()
    if count != args.count:
        raise BenchError(f"read {count} values, expected {args.count}")
    seconds = readable - started
    emit_result({"count": count, "seconds": seconds, "values_per_s": count / seconds})


def cmd_latency(args: argparse.Namespace) -> None:
    reset()
    go = Path(tempfile.gettempdir()) / f"bench-go-{uuid.uuid4().hex}"
    client = dbos_app.client()
    worker = reader = None
    try:
        worker = start_worker(1)
        warm_up(client)
        workflow_id = dbos_app.enqueue(client, "bench.ticker", args.count, args.interval, str(go))
        reader = Child(["-m", MODULE, "read-ticks", workflow_id, "--go", str(go)])
        reader.wait_ready()
        result = reader.result(limit=60 + args.count * args.interval * 3)
        client.retrieve_workflow(workflow_id).get_result()
    finally:
        stop_all([reader, worker])
        client.destroy()
        go.unlink(missing_ok=True)
    latencies = result["latencies_ms"]
    if len(latencies) != args.count:
        raise BenchError(f"read {len(latencies)} timed values, expected {args.count}")
    emit_result(
        {
            "count": len(latencies),
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies),
        }
    )


def cmd_throughput(args: argparse.Namespace) -> None:
    reset()
    client = dbos_app.client()
    children: list[Child] = []
    try:
        for _ in range(args.workers):
            children.append(start_worker(args.concurrency))
        warm_up(client, args.workers * 2)
        started = time.time()
        ids = [dbos_app.enqueue(client, "bench.three_steps", i) for i in range(args.count)]
        enqueued = time.time()
        with sql() as conn:

            def done() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM dbos.workflow_status"
                    " WHERE workflow_uuid = ANY(%s) AND status = ANY(%s)",
                    [ids, list(TERMINAL)],
                ).fetchone()
                return row is not None and row[0] == args.count

            wait_until(done, limit=args.limit, what=f"{args.count} workflows", interval=0.05)
            rows = conn.execute(
                "SELECT status, created_at, updated_at FROM dbos.workflow_status"
                " WHERE workflow_uuid = ANY(%s)",
                [ids],
            ).fetchall()
            entries = conn.execute(
                "SELECT count(*) FROM dbos.streams WHERE workflow_uuid = ANY(%s)", [ids]
            ).fetchone()
    finally:
        stop_all(children)
        client.destroy()
    failed = sum(1 for status, _, _ in rows if status != "SUCCESS")
    if failed:
        raise BenchError(f"{failed} workflows did not succeed")
    if entries is None or entries[0] != 3 * args.count:
        raise BenchError(f"{entries} stream values stored, expected {3 * args.count}")
    last = max(updated for _, _, updated in rows) / 1000
    e2e = [updated - created for _, created, updated in rows]
    seconds = last - started
    emit_result(
        {
            "count": args.count,
            "seconds": seconds,
            "enqueue_seconds": enqueued - started,
            "workflows_per_s": args.count / seconds,
            "p50_ms": percentile(e2e, 50),
            "p99_ms": percentile(e2e, 99),
        }
    )


def cmd_steps(args: argparse.Namespace) -> None:
    reset()
    dbos_app.launch()
    from dbos import DBOS

    out = DBOS.start_workflow(dbos_app.many_steps, args.count).get_result()
    DBOS.destroy()
    emit_result({**out, "steps_per_s": out["count"] / out["seconds"]})


def cmd_recovery(args: argparse.Namespace) -> None:
    """SIGKILL a DBOS process with ``count`` workflows in flight.

    Without DBOS Conductor, a DBOS process recovers, when it launches, the pending
    workflows of its own executor id: so a process with the killed one's id is
    started right after the kill, as a supervisor would.
    """
    reset()
    client = dbos_app.client()
    first = second = None
    executor = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        first = start_worker(args.count + 10, executor)
        ids = [
            dbos_app.enqueue(client, "bench.slow_writer", args.steps, args.delay)
            for _ in range(args.count)
        ]
        with sql() as conn:

            def in_flight() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM dbos.workflow_status w WHERE workflow_uuid = ANY(%s)"
                    " AND status = 'PENDING' AND (SELECT count(*) FROM dbos.streams s"
                    " WHERE s.workflow_uuid = w.workflow_uuid) >= 2",
                    [ids],
                ).fetchone()
                return row is not None and row[0] == args.count

            wait_until(in_flight, limit=60, what=f"{args.count} workflows in flight")
            owners = dict(
                conn.execute(
                    "SELECT workflow_uuid, owner_xid FROM dbos.workflow_status"
                    " WHERE workflow_uuid = ANY(%s)",
                    [ids],
                ).fetchall()
            )
            killed = time.time()
            first.sigkill()
            second = Child(
                ["-m", MODULE, "worker", "--concurrency", str(args.count + 10)]
                + ["--executor-id", executor]
            )
            first_resumed = all_resumed = None
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                rows = conn.execute(
                    "SELECT workflow_uuid, owner_xid, status FROM dbos.workflow_status"
                    " WHERE workflow_uuid = ANY(%s)",
                    [ids],
                ).fetchall()
                now = time.time()
                # A new owner token: another execution took the workflow over.
                resumed = sum(
                    1 for wid, owner, status in rows if owner != owners[wid] or status != "PENDING"
                )
                if resumed and first_resumed is None:
                    first_resumed = now - killed
                if resumed == args.count and all_resumed is None:
                    all_resumed = now - killed
                if all(status == "SUCCESS" for _, _, status in rows):
                    break
                time.sleep(0.02)
            else:
                raise BenchError("the killed process's workflows did not all finish")
            finished = time.time() - killed
            values = conn.execute(
                'SELECT workflow_uuid, "offset", value, serialization FROM dbos.streams'
                " WHERE workflow_uuid = ANY(%s) AND key = 'out'",
                [ids],
            ).fetchall()
    finally:
        stop_all([second])
        if first is not None:
            first.kill()
        client.destroy()
    lost, duplicated = check_streams(ids, args.steps, values)
    emit_result(
        {
            "count": args.count,
            "first_resumed_s": first_resumed,
            "all_resumed_s": all_resumed,
            "finished_s": finished,
            "lost": lost,
            "duplicated": duplicated,
        }
    )


def check_streams(ids: list[str], steps: int, rows: list[Any]) -> tuple[int, int]:
    """Count values missing from, and repeated in, each workflow's stream ``out``.

    Stored texts are compared with the encoding of the expected values; nothing is
    unpickled here.
    """
    expected = {encode(i): i for i in range(steps)}
    closed = encode(CLOSED_SENTINEL)
    by_workflow: dict[str, list[str]] = {wid: [] for wid in ids}
    for workflow_id, _offset, value, _serialization in rows:
        by_workflow[workflow_id].append(value)
    lost = duplicated = 0
    for texts in by_workflow.values():
        seen: set[int] = set()
        for text in texts:
            if text == closed or text == f'"{CLOSED_SENTINEL}"':
                continue
            value = expected.get(text)
            if value is None or value in seen:
                duplicated += 1
            else:
                seen.add(value)
        lost += steps - len(seen)
    return lost, duplicated


# How DBOS marks a closed stream (a value of its own, at the stream's last offset).
CLOSED_SENTINEL = "__DBOS_STREAM_CLOSED__"


def encode(value: Any) -> str:
    """DBOS's default stream value format (base64 of a pickle), checked against its own rows."""
    return base64.b64encode(pickle.dumps(value)).decode()


def cmd_catchup(args: argparse.Namespace) -> None:
    """Item 7: a closed stream of ``count`` values, read from offset 0 in a new process.

    DBOS stores one commit per value, so the stream is filled with one COPY in its
    own row format (checked against the rows DBOS itself wrote for offset 0).
    """
    reset()
    dbos_app.launch()
    from dbos import DBOS

    workflow_id = DBOS.start_workflow(dbos_app.fill_seed).get_workflow_id()
    DBOS.retrieve_workflow(workflow_id).get_result()
    DBOS.destroy()
    with sql() as conn:
        rows = conn.execute(
            'SELECT "offset", value, serialization, function_id FROM dbos.streams'
            ' WHERE workflow_uuid = %s AND key = %s ORDER BY "offset"',
            [workflow_id, "out"],
        ).fetchall()
        if len(rows) != 2 or rows[0][1] != encode({"i": 0}):
            raise BenchError("DBOS's stream row format is not the one this benchmark writes")
        serialization, function_id = rows[0][2], rows[0][3]
        with conn.transaction():
            conn.execute(
                'UPDATE dbos.streams SET "offset" = %s WHERE workflow_uuid = %s AND "offset" = 1',
                [args.count, workflow_id],
            )
            with conn.cursor().copy(
                'COPY dbos.streams (workflow_uuid, key, value, "offset", function_id,'
                " serialization) FROM STDIN"
            ) as copy:
                for i in range(1, args.count):
                    copy.write_row(
                        (workflow_id, "out", encode({"i": i}), i, function_id, serialization)
                    )
    reader = Child(["-m", MODULE, "read-all", workflow_id])
    result = reader.result(limit=300)
    if result["count"] != args.count:
        raise BenchError(f"read {result['count']} values, expected {args.count}")
    emit_result(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup").set_defaults(func=cmd_setup)
    p = sub.add_parser("worker")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--executor-id")
    p.add_argument("--limit", type=float, default=900)
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("read-ticks")
    p.add_argument("workflow_id")
    p.add_argument("--go", required=True)
    p.set_defaults(func=cmd_read_ticks)
    p = sub.add_parser("read-all")
    p.add_argument("workflow_id")
    p.set_defaults(func=cmd_read_all)
    p = sub.add_parser("append")
    p.add_argument("--count", type=int, default=5000)
    p.set_defaults(func=cmd_append)
    p = sub.add_parser("latency")
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--interval", type=float, default=0.01)
    p.set_defaults(func=cmd_latency)
    p = sub.add_parser("throughput")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--limit", type=float, default=300)
    p.set_defaults(func=cmd_throughput)
    p = sub.add_parser("steps")
    p.add_argument("--count", type=int, default=500)
    p.set_defaults(func=cmd_steps)
    p = sub.add_parser("recovery")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--delay", type=float, default=0.1)
    p.set_defaults(func=cmd_recovery)
    p = sub.add_parser("catchup")
    p.add_argument("--count", type=int, default=100_000)
    p.set_defaults(func=cmd_catchup)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.stderr.write(f"bench: {exc}\n")
        sys.exit(2)
