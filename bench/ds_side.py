"""The durable_streams side of each workload, one process per run.

``python -m bench.ds_side <workload> [options]``, with ``BENCH_DS_DB`` set to ``pg``
or ``sqlite``; prints one ``BENCH_RESULT {json}`` line. Worker and reader
processes are this module too (``worker``, ``read-ticks``, ``read-all``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

import django

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.db.models import Count, Max  # noqa: E402

from bench import workflows  # noqa: E402
from bench.common import (  # noqa: E402
    BenchError,
    Child,
    emit_ready,
    emit_result,
    percentile,
    stop_all,
    wait_until,
)
from durable_streams import read_stream, start_workflow  # noqa: E402
from durable_streams.conf import get_config  # noqa: E402
from durable_streams.models import Status, Stream, StreamEntry, Workflow  # noqa: E402
from durable_streams.worker import Worker  # noqa: E402

MODULE = "bench.ds_side"


def backend() -> str:
    return os.environ.get("BENCH_DS_DB", "pg")


# Database set-up


def cmd_migrate(args: argparse.Namespace) -> None:
    call_command("migrate", verbosity=0, interactive=False)
    emit_result({"ok": True})


def reset() -> None:
    """Empty durable_streams' tables so every run starts from the same state."""
    from durable_streams.models import Step

    tables = [m._meta.db_table for m in (StreamEntry, Stream, Step, Workflow)]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
        else:
            for table in tables:
                cursor.execute(f'DELETE FROM "{table}"')


def cmd_reset(args: argparse.Namespace) -> None:
    reset()
    emit_result({"ok": True})


# Helper processes


def cmd_worker(args: argparse.Namespace) -> None:
    worker = Worker(
        queues=[workflows.QUEUE],
        concurrency=args.concurrency,
        worker_id=args.worker_id,
        handle_signals=True,
    )
    emit_ready(worker.worker_id)
    worker.run()


def start_worker(concurrency: int, worker_id: str | None = None) -> Child:
    child = Child(
        ["-m", MODULE, "worker", "--concurrency", str(concurrency)]
        + (["--worker-id", worker_id] if worker_id else [])
    )
    child.wait_ready()
    return child


def warm_up(count: int = 1) -> None:
    """Run trivial workflows so worker processes have connected and imported everything."""
    handles = [workflows.noop.start() for _ in range(count)]
    for handle in handles:
        handle.result(timeout=60)


def cmd_read_ticks(args: argparse.Namespace) -> None:
    """Reader of item 2: latency of each value, from its write time to now."""
    go = Path(args.go)
    latencies: list[float] = []
    emit_ready()
    for value in read_stream(args.workflow_id, "t", timeout=60):
        now = time.time()
        if value["i"] < 0:
            go.touch()
            continue
        latencies.append((now - value["t"]) * 1000.0)
    emit_result({"latencies_ms": latencies})


def cmd_read_all(args: argparse.Namespace) -> None:
    """Reader of item 7: every value of a closed stream, from offset 0."""
    started = time.perf_counter()
    count = 0
    for value in read_stream(args.workflow_id, "out", timeout=60):
        if value["i"] != count:
            raise BenchError(f"value {count} read as {value!r}")
        count += 1
    seconds = time.perf_counter() - started
    emit_result({"count": count, "seconds": seconds, "values_per_s": count / seconds})


# Workloads


def cmd_append(args: argparse.Namespace) -> None:
    """Item 1: one workflow appends ``count`` values; values/s from its start to readable."""
    reset()
    worker = start_worker(1)
    try:
        warm_up()
        handle = workflows.append.start(args.count)
        count = 0
        for value in read_stream(handle.workflow_id, "out", timeout=60):
            if count == 0:
                started = value["t"]
            count += 1
        readable = time.time()
        handle.result(timeout=60)
    finally:
        stop_all([worker])
    if count != args.count:
        raise BenchError(f"read {count} values, expected {args.count}")
    seconds = readable - started
    emit_result({"count": count, "seconds": seconds, "values_per_s": count / seconds})


def cmd_latency(args: argparse.Namespace) -> None:
    """Item 2: write-to-reader latency, the reader blocked in another process."""
    reset()
    go = Path(tempfile.gettempdir()) / f"bench-go-{uuid.uuid4().hex}"
    worker = reader = None
    try:
        worker = start_worker(1)
        warm_up()
        handle = start_workflow(workflows.ticker, args.count, args.interval, str(go))
        reader = Child(["-m", MODULE, "read-ticks", handle.workflow_id, "--go", str(go)])
        reader.wait_ready()
        result = reader.result(limit=60 + args.count * args.interval * 3)
        handle.result(timeout=30)
    finally:
        stop_all([reader, worker])
        go.unlink(missing_ok=True)
    latencies = result["latencies_ms"]
    if len(latencies) != args.count:
        raise BenchError(f"read {len(latencies)} timed values, expected {args.count}")
    emit_result(latency_summary(latencies))


def latency_summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "count": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
    }


def cmd_throughput(args: argparse.Namespace) -> None:
    """Item 5: ``count`` three-step workflows started at once, run by worker processes."""
    reset()
    children: list[Child] = []
    try:
        for _ in range(args.workers):
            children.append(start_worker(args.concurrency))
        warm_up(args.workers * 2)
        started = time.time()
        ids = [workflows.three_steps.start(i).workflow_id for i in range(args.count)]
        enqueued = time.time()
        runs = Workflow.objects.filter(pk__in=ids)

        def done() -> bool:
            left = runs.exclude(status__in=[Status.SUCCESS, Status.ERROR]).count()
            return left == 0

        wait_until(done, limit=args.limit, what=f"{args.count} workflows", interval=0.05)
    finally:
        stop_all(children)
    rows = list(runs.values_list("status", "created_at", "finished_at"))
    failed = sum(1 for status, _, _ in rows if status != Status.SUCCESS)
    if failed:
        raise BenchError(f"{failed} workflows did not succeed")
    last = max(finished for _, _, finished in rows).timestamp()
    e2e = [(finished - created).total_seconds() * 1000 for _, created, finished in rows]
    entries = StreamEntry.objects.filter(stream__workflow_id__in=ids).count()
    if entries != 3 * args.count:
        raise BenchError(f"{entries} stream values stored, expected {3 * args.count}")
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
    """Steps per second inside one workflow, run by a worker in this process."""
    reset()
    handle = workflows.many_steps.start(args.count)
    Worker(queues=[workflows.QUEUE], concurrency=1, burst=True).run()
    out = handle.result(timeout=5)
    emit_result({**out, "steps_per_s": out["count"] / out["seconds"]})


def cmd_recovery(args: argparse.Namespace) -> None:
    """Item 6: SIGKILL a worker with ``count`` workflows in flight; another takes over."""
    reset()
    concurrency = args.count + 10
    first = second = None
    try:
        first = start_worker(concurrency, "bench-first")
        ids = [
            workflows.slow_writer.start(args.steps, args.delay).workflow_id
            for _ in range(args.count)
        ]
        runs = Workflow.objects.filter(pk__in=ids)

        def in_flight() -> bool:
            running = runs.filter(status=Status.RUNNING, lease_owner="bench-first").count()
            writing = Stream.objects.filter(workflow_id__in=ids, length__gte=2).count()
            return running == args.count and writing == args.count

        wait_until(in_flight, limit=60, what=f"{args.count} workflows in flight")
        second = start_worker(concurrency, "bench-second")
        time.sleep(0.5)  # let the second worker reach its wait loop
        if runs.filter(status=Status.RUNNING, lease_owner="bench-first").count() != args.count:
            raise BenchError("workflows ended before the kill: raise --steps")
        killed = time.time()
        first.sigkill()
        first_resumed = all_resumed = None
        deadline = time.monotonic() + get_config().LEASE_SECONDS + 120
        while time.monotonic() < deadline:
            # attempts == 2: claimed by the second worker (the first claim made it 1).
            resumed = runs.filter(attempts__gte=2).count()
            now = time.time()
            if resumed and first_resumed is None:
                first_resumed = now - killed
            if resumed == args.count and all_resumed is None:
                all_resumed = now - killed
            if runs.filter(status=Status.SUCCESS).count() == args.count:
                break
            time.sleep(0.02)
        else:
            raise BenchError("the killed worker's workflows did not all finish")
        finished = time.time() - killed
    finally:
        stop_all([second])
        if first is not None:
            first.kill()
    lost, duplicated = check_streams(ids, args.steps)
    emit_result(
        {
            "count": args.count,
            "lease_seconds": get_config().LEASE_SECONDS,
            "first_resumed_s": first_resumed,
            "all_resumed_s": all_resumed,
            "finished_s": finished,
            "lost": lost,
            "duplicated": duplicated,
        }
    )


def check_streams(ids: list[str], steps: int) -> tuple[int, int]:
    """Count values missing from, and repeated in, each workflow's stream ``out``."""
    lost = duplicated = 0
    by_workflow: dict[str, list[tuple[int, Any]]] = {wid: [] for wid in ids}
    rows = StreamEntry.objects.filter(stream__workflow_id__in=ids, stream__key="out")
    for workflow_id, offset, value in rows.values_list("stream__workflow_id", "offset", "value"):
        by_workflow[workflow_id].append((offset, int(value)))
    for entries in by_workflow.values():
        values = [v for _, v in sorted(entries)]
        expected = set(range(steps))
        seen: set[int] = set()
        for value in values:
            if value in seen or value not in expected:
                duplicated += 1
            seen.add(value)
        lost += len(expected - seen)
        if [o for o, _ in sorted(entries)] != list(range(len(entries))):
            raise BenchError("stream offsets are not contiguous")
    repeated = (
        StreamEntry.objects.filter(stream__workflow_id__in=ids)
        .values("stream_id", "offset")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .count()
    )
    return lost, duplicated + repeated


def cmd_catchup(args: argparse.Namespace) -> None:
    """Item 7: fill a stream of ``count`` values and close it; read it from 0 in a new process."""
    reset()
    handle = workflows.fill.start(args.count)
    started = time.perf_counter()
    Worker(queues=[workflows.QUEUE], concurrency=1, burst=True).run()
    fill_seconds = time.perf_counter() - started
    handle.result(timeout=5)
    length = Stream.objects.filter(workflow_id=handle.workflow_id).aggregate(n=Max("length"))["n"]
    if length != args.count:
        raise BenchError(f"stream holds {length} values, expected {args.count}")
    reader = Child(["-m", MODULE, "read-all", handle.workflow_id])
    result = reader.result(limit=300)
    if result["count"] != args.count:
        raise BenchError(f"read {result['count']} values, expected {args.count}")
    emit_result({**result, "fill_values_per_s": args.count / fill_seconds})


def fill_workflows(count: int) -> None:
    """Add ``count`` ended workflows (some failed), in bulk, oldest first."""
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    batch: list[Workflow] = []
    existing = Workflow.objects.count()
    for i in range(existing, existing + count):
        status = Status.ERROR if i % 10 == 0 else Status.SUCCESS
        created = now - timedelta(seconds=count - i)
        batch.append(
            Workflow(
                id=f"bench-{i:07d}",
                name=f"bench.job{i % 7}",
                queue="bench",
                status=status,
                inputs='{"args":[],"kwargs":{}}',
                output=None if status == Status.ERROR else str(i),
                error='{"type":"ValueError","message":"bad","traceback":""}'
                if status == Status.ERROR
                else None,
                max_attempts=3,
                attempts=1,
                created_at=created,
                updated_at=created,
                started_at=created,
                finished_at=created,
            )
        )
        if len(batch) == 5000:
            Workflow.objects.bulk_create(batch)
            batch = []
    if batch:
        Workflow.objects.bulk_create(batch)


def cmd_admin(args: argparse.Namespace) -> None:
    """Item 8: render page 1 of the workflow changelist; time and queries, small vs large."""
    from django.contrib.auth import get_user_model
    from django.db import connection as default_connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    reset()
    user_model = get_user_model()
    user = user_model.objects.filter(username="bench-admin").first()
    if user is None:
        user = user_model.objects.create_superuser("bench-admin", "bench@localhost", "x")
    client = Client()
    client.force_login(user)
    url = "/admin/durable_streams/workflow/"

    def render() -> tuple[list[float], int]:
        times = []
        for _ in range(args.renders):
            with CaptureQueriesContext(default_connection) as queries:
                started = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise BenchError(f"the changelist answered {response.status_code}")
        return times, len(queries)

    fill_workflows(args.small)
    render()  # templates and connections warm up
    small_times, small_queries = render()
    fill_workflows(args.count - args.small)
    if Workflow.objects.count() != args.count:
        raise BenchError("the workflows were not all stored")
    times, queries = render()
    emit_result(
        {
            "count": args.count,
            "render_ms": percentile(times, 50),
            "queries": queries,
            "small_count": args.small,
            "small_render_ms": percentile(small_times, 50),
            "small_queries": small_queries,
            "query_growth": queries - small_queries,
        }
    )


# Items 3 and 4: through the ASGI server and the channel layer to WebSocket clients


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(env: dict[str, str], port: int) -> Child:
    import socket

    server = Child(
        ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
        # A thousand sockets opening at once wait in line for their handshake.
        + ["--websocket_connect_timeout", "60", "bench.asgi:application"],
        env=env,
        quiet=True,
        log=os.environ.get("BENCH_SERVER_LOG"),
    )

    def listening() -> bool:
        if server.proc.poll() is not None:
            raise BenchError(f"the ASGI server exited with {server.proc.returncode}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, limit=60, what="the ASGI server")
    return server


def push_env(query_file: str | None = None) -> dict[str, str]:
    env = {"BENCH_REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")}
    if query_file:
        env["BENCH_QUERY_COUNT_FILE"] = query_file
    return env


def cmd_browser(args: argparse.Namespace) -> None:
    """Item 3: write-to-WebSocket latency: worker, ASGI server and client, 3 processes."""
    reset()
    go = Path(tempfile.gettempdir()) / f"bench-go-{uuid.uuid4().hex}"
    env = push_env()
    port = free_port()
    worker = server = client = None
    try:
        worker = Child(["-m", MODULE, "worker", "--concurrency", "1"], env=env)
        worker.wait_ready()
        server = start_server({**env, "BENCH_CONN_MAX_AGE": "60"}, port)
        warm_up()
        handle = start_workflow(workflows.ticker, args.count, args.interval, str(go), public=True)
        url = f"ws://127.0.0.1:{port}/ws/durable-streams/{handle.workflow_id}/t/"
        client = Child(["-m", "bench.ws_client", "latency", url, "--go", str(go)])
        client.wait_ready()
        result = client.result(limit=60 + args.count * args.interval * 3)
        handle.result(timeout=30)
    finally:
        stop_all([client, server, worker])
        go.unlink(missing_ok=True)
    latencies = result["latencies_ms"]
    if len(latencies) != args.count or result["ended"] != "closed":
        raise BenchError(f"received {len(latencies)} values of {args.count} ({result['ended']})")
    emit_result(latency_summary(latencies))


def cmd_fanout(args: argparse.Namespace) -> None:
    """Item 4: ``clients`` sockets on one stream from one ASGI process, ``rate`` values/s."""
    from bench.common import cpu_seconds, rss_mb

    reset()
    go = Path(tempfile.gettempdir()) / f"bench-go-{uuid.uuid4().hex}"
    counter = Path(tempfile.gettempdir()) / f"bench-queries-{uuid.uuid4().hex}"
    port = free_port()
    count = int(args.rate * args.seconds)
    worker = server = client = None
    profilers: list[subprocess.Popen[bytes]] = []
    try:
        worker = Child(["-m", MODULE, "worker", "--concurrency", "1"], env=push_env())
        worker.wait_ready()
        server = start_server({**push_env(str(counter)), "BENCH_CONN_MAX_AGE": "60"}, port)
        warm_up()
        handle = start_workflow(workflows.ticker, count, 1.0 / args.rate, str(go), public=True)
        url = f"ws://127.0.0.1:{port}/ws/durable-streams/{handle.workflow_id}/t/"
        client = Child(
            ["-m", "bench.ws_client", "fanout", url, "--go", str(go)]
            + ["--clients", str(args.clients), "--ramp", str(args.ramp)]
        )
        client.wait_ready(limit=180)
        beside = Path(sys.executable).with_name("py-spy")  # the venv's, if not on PATH
        spy = str(beside) if beside.exists() else "py-spy"
        for path, pid in ((args.profile, server.pid), (args.profile_client, client.pid)):
            if path:
                # py-spy (pip install py-spy) samples the process while values flow.
                profilers.append(
                    subprocess.Popen(
                        [spy, "record", "-p", str(pid), "-o", path]
                        + ["-f", "raw", "-d", str(int(args.seconds)), "-r", "100"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        time.sleep(0.6)  # the query count file is rewritten every 0.5 s
        queries_before = int(counter.read_text())
        cpu_before = cpu_seconds(server.pid)
        started = time.monotonic()
        peak_rss = rss_mb(server.pid)
        deadline = started + args.seconds * 3 + 60
        while client.proc.poll() is None and time.monotonic() < deadline:
            peak_rss = max(peak_rss, rss_mb(server.pid))
            time.sleep(0.25)
        cpu = cpu_seconds(server.pid) - cpu_before
        elapsed = time.monotonic() - started
        time.sleep(0.6)
        queries = int(counter.read_text()) - queries_before
        result = client.result(limit=args.seconds * 3 + 120)
        handle.result(timeout=30)
        for profiler in profilers:
            profiler.wait(30)
    finally:
        stop_all([client, server, worker])
        go.unlink(missing_ok=True)
        counter.unlink(missing_ok=True)
    delivered = sum(result["counts"])
    expected = args.clients * count
    emit_result(
        {
            "clients": args.clients,
            "values": count,
            "delivered_pct": 100.0 * delivered / expected,
            "connected": result["connected"],
            "closed": result["closed"],
            "errors": result["errors"],
            "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"],
            "server_cpu_pct": 100.0 * cpu / elapsed,
            "server_rss_mb": peak_rss,
            "queries_per_value": queries / count,
            "connect_s": result["connect_s"],
            "client_cpu_pct": result.get("client_cpu_pct"),
        }
    )


# Item 9: readers that never read


def start_uvicorn(env: dict[str, str], port: int) -> Child:
    import socket

    server = Child(
        ["-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off"]
        + ["--log-level", "warning", "bench.asgi:application"],
        env=env,
        quiet=True,
        log=os.environ.get("BENCH_SERVER_LOG"),
    )

    def listening() -> bool:
        if server.proc.poll() is not None:
            raise BenchError(f"uvicorn exited with {server.proc.returncode}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, limit=60, what="uvicorn")
    return server


def settled_rss_mb(pid: int, quiet: float = 1.0, limit: float = 90.0) -> float:
    """The process's RSS once it has used (almost) no CPU for ``quiet`` seconds."""
    from bench.common import cpu_seconds, rss_mb

    samples: list[tuple[float, float]] = []

    def idle() -> bool:
        now, cpu = time.monotonic(), cpu_seconds(pid)
        samples.append((now, cpu))
        before = [c for at, c in samples if now - at >= quiet]
        return bool(before) and cpu - before[-1] <= 0.02

    wait_until(idle, limit=limit, what="the ASGI server to go idle", interval=0.1)
    return rss_mb(pid)


def idle_socket(port: int, request: str) -> Any:
    """A socket that sends ``request``, reads the response head at most, and then nothing."""
    import socket

    sock = socket.socket()
    # A small receive buffer, set before connecting: the kernel holds little of what
    # the server sends, so what the server itself keeps shows in its RSS.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request.encode())
    if "Upgrade: websocket" in request:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)  # one byte at a time: nothing past the handshake
            if not chunk:
                raise BenchError(f"the handshake failed: {head!r}")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise BenchError(f"the handshake failed: {head!r}")
    return sock


def read_whole(port: int, workflow_id: str) -> None:
    """Read a short stream to its end over both endpoints: every code path is loaded."""
    import socket

    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{port}/ws/durable-streams/{workflow_id}/out/"
    frames = 0
    with connect(url, origin="http://127.0.0.1", open_timeout=30) as ws:
        for _ in ws:
            frames += 1
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"GET /durable-streams/{workflow_id}/out/events HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        body = b""
        while chunk := sock.recv(65536):
            body += chunk
    if frames < 2 or b"event: closed" not in body:
        raise BenchError("the warm-up read did not see the whole stream")


def cmd_idle_readers(args: argparse.Namespace) -> None:
    """Item 9: RSS growth of the ASGI server for 1 and N clients that never read."""
    import importlib.util

    reset()
    small = start_workflow(workflows.fill_sized, 200, args.chars, public=True)
    large = start_workflow(workflows.fill_sized, args.count, args.chars, public=True)
    Worker(queues=[workflows.QUEUE], concurrency=1, burst=True).run()
    small.result(timeout=5)
    large.result(timeout=5)
    servers = {"daphne": start_server, "uvicorn": start_uvicorn}
    if importlib.util.find_spec("uvicorn") is None:
        del servers["uvicorn"]
    ws = (
        f"GET /ws/durable-streams/{large.workflow_id}/out/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: ZHVyYWJsZS1zdHJlYW1zIQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Origin: http://127.0.0.1\r\n\r\n"
    )
    sse = f"GET /durable-streams/{large.workflow_id}/out/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    result: dict[str, Any] = {"values": args.count, "value_chars": args.chars}
    for name, start in servers.items():
        for kind, request in (("ws", ws), ("sse", sse)):
            for clients in (1, args.clients):
                # A server of its own for each measurement: no memory left from the last.
                port = free_port()
                server = start({"BENCH_CONN_MAX_AGE": "60"}, port)
                sockets: list[Any] = []
                try:
                    read_whole(port, small.workflow_id)
                    baseline = settled_rss_mb(server.pid)
                    started = time.monotonic()
                    sockets = [idle_socket(port, request) for _ in range(clients)]
                    after = settled_rss_mb(server.pid)
                    result[f"{name}_{kind}_{clients}_mb"] = after - baseline
                    result[f"{name}_{kind}_{clients}_s"] = time.monotonic() - started
                finally:
                    for sock in sockets:
                        sock.close()
                    server.stop()
    emit_result(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate").set_defaults(func=cmd_migrate)
    sub.add_parser("reset").set_defaults(func=cmd_reset)
    p = sub.add_parser("worker")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--worker-id")
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
    p.add_argument("--limit", type=float, default=240)
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
    p = sub.add_parser("browser")
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--interval", type=float, default=0.01)
    p.set_defaults(func=cmd_browser)
    p = sub.add_parser("fanout")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rate", type=float, default=20)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--ramp", type=float, default=100, help="new sockets per second")
    p.add_argument("--profile", help="write a py-spy profile of the ASGI server here")
    p.add_argument("--profile-client", help="write a py-spy profile of the client process here")
    p.set_defaults(func=cmd_fanout)
    p = sub.add_parser("idle-readers")
    p.add_argument("--count", type=int, default=50_000)
    p.add_argument("--chars", type=int, default=1000)
    p.add_argument("--clients", type=int, default=100)
    p.set_defaults(func=cmd_idle_readers)
    p = sub.add_parser("admin")
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--renders", type=int, default=5)
    p.set_defaults(func=cmd_admin)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.stderr.write(f"bench: {exc}\n")
        sys.exit(2)
