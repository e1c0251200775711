"""Run every workload on durable_streams and DBOS, side by side, and print one table.

``python -m bench`` (full run, about 10 minutes on 2 cores) or ``python -m bench --quick``
(small sizes, under 2 minutes). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.common import ROOT, BenchError, child_env, parse_result

RESULTS = Path(__file__).resolve().parent / "results"

DS_PG = "ds-pg"
DBOS = "dbos-pg"
DS_SQLITE = "ds-sqlite"
SYSTEMS = {
    DS_PG: "durable_streams · PostgreSQL",
    DBOS: "DBOS · PostgreSQL",
    DS_SQLITE: "durable_streams · SQLite",
}
# With --baseline: the same durable_streams workloads run from another checkout, each
# right after this tree's, so that a change is measured against its parent in one run.
BASE = "@base"
BASE_SYSTEMS = {DS_PG: DS_PG + BASE, DS_SQLITE: DS_SQLITE + BASE}


# What a run measures


@dataclass
class Sizes:
    repeats: int
    append: int
    ticks: int
    workflows: int
    concurrency: int
    dbos_concurrency: int
    steps: int
    recovery: int
    recovery_steps: int
    catchup: int
    commit_seconds: float
    lease_seconds: float | None  # None: durable_streams' default
    browser_ticks: int
    fanout_clients: int
    fanout_seconds: float
    admin_rows: int
    idle_values: int
    idle_clients: int


FULL = Sizes(
    repeats=3,
    append=5000,
    ticks=300,
    workflows=1000,
    concurrency=8,
    dbos_concurrency=8,
    steps=500,
    recovery=50,
    recovery_steps=30,
    catchup=100_000,
    commit_seconds=3.0,
    lease_seconds=None,
    browser_ticks=300,
    fanout_clients=1000,
    fanout_seconds=30,
    admin_rows=100_000,
    idle_values=50_000,
    idle_clients=100,
)
QUICK = Sizes(
    repeats=1,
    append=1000,
    ticks=100,
    workflows=200,
    concurrency=8,
    dbos_concurrency=8,
    steps=200,
    recovery=20,
    recovery_steps=20,
    catchup=10_000,
    commit_seconds=1.5,
    lease_seconds=3.0,
    browser_ticks=100,
    fanout_clients=100,
    fanout_seconds=5,
    admin_rows=10_000,
    idle_values=20_000,
    idle_clients=100,
)


@dataclass
class Workload:
    """One workload: which systems run it, and the command that runs it on each."""

    name: str
    item: str
    title: str
    systems: tuple[str, ...]
    command: Callable[[str, Sizes], list[str]]
    repeats: Callable[[Sizes], int] = lambda sizes: sizes.repeats
    limit: float = 300.0
    # Returns a reason when the workload cannot run in this tree yet.
    unavailable: Callable[[], str | None] = lambda: None


def _side(system: str) -> str:
    return "bench.dbos_side" if system == DBOS else "bench.ds_side"


def _simple(workload: str, option: str, size: Callable[[Sizes], int]) -> Callable[..., list[str]]:
    def command(system: str, sizes: Sizes) -> list[str]:
        return ["-m", _side(system), workload, option, str(size(sizes))]

    return command


def _throughput(system: str, sizes: Sizes) -> list[str]:
    concurrency = sizes.dbos_concurrency if system == DBOS else sizes.concurrency
    return [
        "-m",
        _side(system),
        "throughput",
        "--count",
        str(sizes.workflows),
        "--workers",
        "2",
        "--concurrency",
        str(concurrency),
    ]


def _recovery(system: str, sizes: Sizes) -> list[str]:
    return [
        "-m",
        _side(system),
        "recovery",
        "--count",
        str(sizes.recovery),
        "--steps",
        str(sizes.recovery_steps),
    ]


def _push_unavailable() -> str | None:
    if not (ROOT / "durable_streams" / "web" / "consumers.py").exists():
        return "needs durable_streams/web/consumers.py (issue 3)"
    try:
        import websockets  # noqa: F401
    except ImportError:
        return "needs the websockets package: pip install -e '.[bench]'"
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex(("127.0.0.1", 6379)) != 0:
            return "needs Redis on 127.0.0.1:6379"
    return None


def _idle_unavailable() -> str | None:
    try:
        import websockets  # noqa: F401
    except ImportError:
        return "needs the websockets package: pip install -e '.[bench]'"
    if not Path("/proc/self/status").exists():
        return "needs Linux /proc for the server's RSS"
    return None


def _admin_unavailable() -> str | None:
    if not (ROOT / "durable_streams" / "admin").is_dir():
        return "needs durable_streams/admin/ (issue 4)"
    return None


WORKLOADS = [
    Workload(
        "commit_rate",
        "1",
        "PostgreSQL single-row commits",
        ("pg",),
        lambda system, sizes: (
            ["-m", "bench.pg_side", "commit-rate"] + ["--seconds", str(sizes.commit_seconds)]
        ),
    ),
    Workload(
        "append",
        "1",
        "Stream append",
        (DS_PG, DBOS, DS_SQLITE),
        _simple("append", "--count", lambda s: s.append),
    ),
    Workload(
        "floor",
        "2",
        "PostgreSQL write-to-LISTEN floor",
        ("pg",),
        lambda system, sizes: (
            ["-m", "bench.pg_side", "notify-latency"] + ["--count", str(sizes.ticks)]
        ),
    ),
    Workload(
        "latency",
        "2",
        "Write-to-reader latency",
        (DS_PG, DBOS, DS_SQLITE),
        _simple("latency", "--count", lambda s: s.ticks),
    ),
    Workload(
        "browser",
        "3",
        "Write-to-browser latency",
        (DS_PG, DS_SQLITE),
        _simple("browser", "--count", lambda s: s.browser_ticks),
        unavailable=_push_unavailable,
    ),
    Workload(
        "fanout",
        "4",
        "Fan-out to WebSockets",
        (DS_PG,),
        lambda system, sizes: (
            ["-m", "bench.ds_side", "fanout"]
            + ["--clients", str(sizes.fanout_clients), "--seconds", str(sizes.fanout_seconds)]
        ),
        repeats=lambda sizes: 1,
        limit=400.0,
        unavailable=_push_unavailable,
    ),
    Workload(
        "throughput",
        "5",
        "Workflow throughput",
        (DS_PG, DBOS, DS_SQLITE),
        _throughput,
        # The longest workload: two repeats keep the full run within ten minutes.
        repeats=lambda sizes: min(sizes.repeats, 2),
    ),
    Workload(
        "steps",
        "5",
        "Steps in one workflow",
        (DS_PG, DBOS, DS_SQLITE),
        _simple("steps", "--count", lambda s: s.steps),
    ),
    Workload(
        "recovery",
        "6",
        "Recovery after SIGKILL",
        (DS_PG, DBOS, DS_SQLITE),
        _recovery,
        repeats=lambda sizes: 1,
    ),
    Workload(
        "catchup",
        "7",
        "Catch-up read",
        (DS_PG, DBOS, DS_SQLITE),
        _simple("catchup", "--count", lambda s: s.catchup),
        repeats=lambda sizes: min(sizes.repeats, 2),
    ),
    Workload(
        "admin",
        "8",
        "Admin changelist",
        (DS_PG, DS_SQLITE),
        _simple("admin", "--count", lambda s: s.admin_rows),
        repeats=lambda sizes: 1,
        unavailable=_admin_unavailable,
    ),
    Workload(
        "idle_readers",
        "9",
        "Readers that never read",
        (DS_PG,),
        lambda system, sizes: (
            ["-m", "bench.ds_side", "idle-readers"]
            + ["--count", str(sizes.idle_values), "--clients", str(sizes.idle_clients)]
        ),
        unavailable=_idle_unavailable,
    ),
]


# Running


@dataclass
class Run:
    sizes: Sizes
    quick: bool
    sqlite_path: Path
    log: Path
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    baseline: Path | None = None

    def env(self, system: str) -> dict[str, str]:
        mine = system.removesuffix(BASE)
        env = {"BENCH_DS_DB": "sqlite" if mine == DS_SQLITE else "pg"}
        env["BENCH_SQLITE_PATH"] = str(self.sqlite_path)
        if self.sizes.lease_seconds is not None:
            env["BENCH_LEASE_SECONDS"] = str(self.sizes.lease_seconds)
        if system.endswith(BASE) and self.baseline is not None:
            env["BENCH_DS_DB_NAME"] = _base_db_name()
            env["BENCH_SQLITE_PATH"] = str(self.sqlite_path.with_name("ds_bench_base.sqlite3"))
            env["PYTHONPATH"] = str(self.baseline)
        return env

    def cwd(self, system: str) -> Path:
        return self.baseline if system.endswith(BASE) and self.baseline else ROOT

    def run_child(self, args: list[str], system: str, limit: float) -> dict[str, Any]:
        with self.log.open("a") as log:
            log.write(f"\n=== {system}: {' '.join(args)}\n")
            log.flush()
            try:
                done = subprocess.run(
                    [sys.executable, *args],
                    cwd=self.cwd(system),
                    env=child_env(self.env(system)),
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    timeout=limit,
                )
            except subprocess.TimeoutExpired:
                raise BenchError(f"{' '.join(args)} took more than {limit:.0f}s") from None
            log.write(done.stdout)
        return parse_result(done.stdout, args, done.returncode)


def pg_admin_url() -> str:
    base = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
    return f"{base.rstrip('/')}/postgres"


def recreate_databases(names: list[str]) -> None:
    with psycopg.connect(pg_admin_url(), autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')


def _base_db_name() -> str:
    return os.environ.get("BENCH_DS_DB_NAME", "ds_bench") + "_base"


def with_baselines(systems: tuple[str, ...]) -> list[str]:
    """The systems of a workload, each of ours followed by its baseline twin."""
    out = []
    for system in systems:
        out.append(system)
        if system in BASE_SYSTEMS:
            out.append(BASE_SYSTEMS[system])
    return out


def check_baseline(path: Path) -> None:
    """Refuse a baseline whose processes would import this tree's package instead."""
    if not (path / "durable_streams").is_dir() or not (path / "bench" / "ds_side.py").is_file():
        raise SystemExit(f"--baseline {path}: not a durable_streams checkout with bench/")
    found = subprocess.run(
        [sys.executable, "-c", "import durable_streams; print(durable_streams.__file__)"],
        cwd=path,
        env=child_env({"PYTHONPATH": str(path)}),
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not found.startswith(str(path.resolve())):
        raise SystemExit(f"--baseline {path}: its processes import durable_streams from {found}")


def set_up(run: Run, systems: set[str]) -> None:
    """Fresh databases for this run: dropped and created again, then migrated."""
    names = []
    if DS_PG in systems or "pg" in systems:
        names.append(os.environ.get("BENCH_DS_DB_NAME", "ds_bench"))
    if DBOS in systems:
        names.append(os.environ.get("BENCH_DBOS_DB_NAME", "dbos_bench"))
    if BASE_SYSTEMS[DS_PG] in systems:
        names.append(_base_db_name())
    recreate_databases(names)
    for base in (BASE_SYSTEMS[DS_PG], BASE_SYSTEMS[DS_SQLITE]):
        if base in systems:
            if base.startswith(DS_SQLITE):
                Path(run.env(base)["BENCH_SQLITE_PATH"]).unlink(missing_ok=True)
            run.run_child(["-m", "bench.ds_side", "migrate"], base, 120)
    if DS_PG in systems or "pg" in systems:
        run.run_child(["-m", "bench.ds_side", "migrate"], DS_PG, 120)
    if DS_SQLITE in systems:
        for suffix in ("", "-wal", "-shm"):
            Path(str(run.sqlite_path) + suffix).unlink(missing_ok=True)
        run.run_child(["-m", "bench.ds_side", "migrate"], DS_SQLITE, 120)
    if DBOS in systems:
        run.run_child(["-m", "bench.dbos_side", "setup"], DBOS, 120)


def execute(run: Run, workloads: list[Workload], systems: set[str]) -> None:
    """Every repeat runs each workload on each system in turn, so load drifts hit all alike."""
    most = max(w.repeats(run.sizes) for w in workloads)
    for repeat in range(most):
        for workload in workloads:
            if repeat >= workload.repeats(run.sizes):
                continue
            for system in with_baselines(workload.systems):
                if system != "pg" and system not in systems:
                    continue
                if workload.name in run.errors and system in run.errors[workload.name]:
                    continue
                args = workload.command(system, run.sizes)
                label = f"[{repeat + 1}/{workload.repeats(run.sizes)}] {workload.title} · {system}"
                started = time.monotonic()
                try:
                    result = run.run_child(args, system, workload.limit)
                except BenchError as exc:
                    run.errors.setdefault(workload.name, {})[system] = str(exc)
                    print(f"{label}: FAILED ({exc}; see {run.log})", flush=True)
                    continue
                run.results.setdefault(workload.name, {}).setdefault(system, []).append(result)
                print(f"{label}: {brief(result)} ({time.monotonic() - started:.0f}s)", flush=True)


def brief(result: dict[str, Any]) -> str:
    keys = [
        k
        for k in result
        if k.endswith(("_per_s", "_ms", "_s")) and not k.startswith("fill") and k != "max_ms"
    ]
    return ", ".join(f"{k} {result[k]:,.1f}" for k in keys if result[k] is not None)


# Machine


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        with psycopg.connect(pg_admin_url(), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            info["postgresql"] = row[0] if row else "?"
    except psycopg.Error as exc:
        info["postgresql"] = f"unreachable: {exc}"
    import sqlite3

    info["sqlite"] = sqlite3.sqlite_version
    for package in ("dbos", "django", "psycopg"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            info[package] = "not installed"
    return info


def cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / ticks, sum(fields) / ticks


def postgres_cpu() -> float:
    """CPU seconds used so far by PostgreSQL server processes, live and ended (Linux /proc).

    Backends that ended count in their parent's (the postmaster's) children time.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text.split(" (", 1)[1].rsplit(")", 1)
        if name.startswith("postgres"):
            fields = rest.split()
            total += sum(int(f) for f in fields[11:15]) / ticks
    return total


def own_cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


# The table


@dataclass
class Cell:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def show(self, digits: int) -> str:
        if not self.values:
            return "–"
        text = fmt(self.median, digits)
        if len(self.values) > 1:
            text += f" ({fmt(min(self.values), digits)}–{fmt(max(self.values), digits)})"
        return text


def fmt(value: float, digits: int) -> str:
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


@dataclass
class Row:
    item: str
    label: str
    workload: str
    metric: str
    digits: int
    higher_better: bool
    target: str = ""
    verdict: Callable[[dict[str, Cell]], str | None] | None = None


def cells(run: Run, workload: str, metric: str) -> dict[str, Cell]:
    out = {}
    for system, results in run.results.get(workload, {}).items():
        values = [r[metric] for r in results if r.get(metric) is not None]
        out[system] = Cell(values)
    return out


def ratio(
    row: Row, by_system: dict[str, Cell], mine: str = DS_PG, peer: str = DBOS
) -> float | None:
    """How many times better ``mine`` did than ``peer`` on ``row`` (above 1: better)."""
    ours, theirs = by_system.get(mine), by_system.get(peer)
    if not ours or not theirs or not ours.values or not theirs.values:
        return None
    if row.higher_better:
        return ours.median / theirs.median if theirs.median else None
    return theirs.median / ours.median if ours.median else None


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def build_rows(run: Run) -> list[Row]:
    commit = cells(run, "commit_rate", "commits_per_s").get("pg")
    commit_rate = commit.median if commit and commit.values else None

    def appends(c: dict[str, Cell]) -> str | None:
        ours, theirs = c.get(DS_PG), c.get(DBOS)
        if not ours or not ours.values or not theirs or not theirs.values or not commit_rate:
            return None
        vs_dbos = ours.median / theirs.median
        vs_pg = ours.median / commit_rate
        return (
            f"{_met(vs_dbos >= 20)} ({vs_dbos:,.0f}× DBOS); "
            f"{_met(vs_pg >= 3)} ({vs_pg:.1f}× PG commits)"
        )

    def below(limit: float, far: bool = True) -> Callable[[dict[str, Cell]], str | None]:
        def check(c: dict[str, Cell]) -> str | None:
            ours, theirs = c.get(DS_PG), c.get(DBOS)
            if not ours or not ours.values:
                return None
            text = _met(ours.median < limit)
            if far and theirs and theirs.values:
                text += f"; {theirs.median / ours.median:.1f}× lower than DBOS"
            return text

        return check

    def times(factor: float) -> Callable[[dict[str, Cell]], str | None]:
        def check(c: dict[str, Cell]) -> str | None:
            ours, theirs = c.get(DS_PG), c.get(DBOS)
            if not ours or not ours.values or not theirs or not theirs.values:
                return None
            return f"{_met(ours.median >= factor * theirs.median)}"

        return check

    def resume(c: dict[str, Cell]) -> str | None:
        ours = c.get(DS_PG)
        results = run.results.get("recovery", {}).get(DS_PG, [])
        if not ours or not ours.values or not results:
            return None
        lease = results[0]["lease_seconds"]
        return f"{_met(ours.median <= lease + 2 and lease <= 15)} (lease {lease:g}s + 2s)"

    def exact(c: dict[str, Cell]) -> str | None:
        found = [cell for cell in c.values() if cell.values]
        if not found:
            return None
        return _met(all(v == 0 for cell in found for v in cell.values))

    def browser(limit: float) -> Callable[[dict[str, Cell]], str | None]:
        def check(c: dict[str, Cell]) -> str | None:
            ours = c.get(DS_PG)
            if not ours or not ours.values:
                return None
            text = _met(ours.median < limit)
            metric = "p50_ms" if limit < 10 else "p99_ms"
            reader = cells(run, "latency", metric).get(DBOS)
            if reader and reader.values:
                text += f"; {reader.median / ours.median:.1f}× lower than DBOS's reader"
            return text

        return check

    def at_most(limit: float, what: str = "") -> Callable[[dict[str, Cell]], str | None]:
        def check(c: dict[str, Cell]) -> str | None:
            ours = c.get(DS_PG)
            if not ours or not ours.values:
                return None
            return _met(ours.median <= limit) + what

        return check

    def at_least(limit: float) -> Callable[[dict[str, Cell]], str | None]:
        def check(c: dict[str, Cell]) -> str | None:
            ours = c.get(DS_PG)
            if not ours or not ours.values:
                return None
            return _met(ours.median >= limit)

        return check

    sizes = run.sizes
    return [
        Row("1", "PostgreSQL single-row commits/s (peer)", "commit_rate", "commits_per_s", 0, True),
        Row(
            "1",
            f"Stream append, values/s ({sizes.append:,} values)",
            "append",
            "values_per_s",
            0,
            True,
            "≥20× DBOS; ≥3× PG commits/s",
            appends,
        ),
        Row(
            "2",
            "PostgreSQL INSERT+NOTIFY → LISTEN p50, ms (peer floor)",
            "floor",
            "p50_ms",
            1,
            False,
        ),
        Row(
            "2",
            "PostgreSQL INSERT+NOTIFY → LISTEN p99, ms (peer floor)",
            "floor",
            "p99_ms",
            1,
            False,
        ),
        Row(
            "2",
            "Write-to-reader p50, ms",
            "latency",
            "p50_ms",
            1,
            False,
            "<3 ms, far below DBOS",
            below(3),
        ),
        Row(
            "2",
            "Write-to-reader p99, ms",
            "latency",
            "p99_ms",
            1,
            False,
            "<15 ms, far below DBOS",
            below(15),
        ),
        Row(
            "3",
            "Write-to-browser (WebSocket) p50, ms",
            "browser",
            "p50_ms",
            1,
            False,
            "<5 ms, far below DBOS",
            browser(5),
        ),
        Row(
            "3",
            "Write-to-browser (WebSocket) p99, ms",
            "browser",
            "p99_ms",
            1,
            False,
            "<20 ms, far below DBOS",
            browser(20),
        ),
        Row(
            "4",
            f"Fan-out, {sizes.fanout_clients:,} sockets × 20 values/s: delivered %",
            "fanout",
            "delivered_pct",
            1,
            True,
            "100%",
            at_least(100),
        ),
        Row("4", "Fan-out latency p50, ms", "fanout", "p50_ms", 0, False),
        Row("4", "Fan-out latency p99, ms", "fanout", "p99_ms", 0, False, "<250 ms", at_most(250)),
        Row("4", "Fan-out server CPU, % of one core", "fanout", "server_cpu_pct", 0, False),
        Row("4", "Fan-out server memory (peak RSS), MB", "fanout", "server_rss_mb", 0, False),
        Row("4", "Fan-out client process CPU, % of one core", "fanout", "client_cpu_pct", 0, False),
        Row(
            "4",
            "Fan-out database queries per value (server)",
            "fanout",
            "queries_per_value",
            2,
            False,
            "≤1, not per client",
            at_most(1),
        ),
        Row(
            "5",
            f"Workflow throughput, workflows/s ({sizes.workflows:,} × 3 steps, 2 workers)",
            "throughput",
            "workflows_per_s",
            0,
            True,
            "≥10× DBOS",
            times(10),
        ),
        Row("5", "Workflow end-to-end p50, ms", "throughput", "p50_ms", 0, False),
        Row("5", "Workflow end-to-end p99, ms", "throughput", "p99_ms", 0, False),
        Row(
            "5",
            f"Steps/s in one workflow ({sizes.steps} steps)",
            "steps",
            "steps_per_s",
            0,
            True,
            "≥5× DBOS",
            times(5),
        ),
        Row(
            "6",
            "Recovery: first workflow resumed, s after SIGKILL",
            "recovery",
            "first_resumed_s",
            1,
            False,
            "≤ lease + 2 s; lease ≤15 s",
            resume,
        ),
        Row(
            "6", f"Recovery: all {sizes.recovery} resumed, s", "recovery", "all_resumed_s", 1, False
        ),
        Row("6", "Recovery: all finished, s", "recovery", "finished_s", 1, False),
        Row(
            "6",
            "Recovery: values lost + duplicated",
            "recovery",
            "lost",
            0,
            False,
            "0",
            exact,
        ),
        Row(
            "7",
            f"Catch-up read, values/s ({sizes.catchup:,} closed)",
            "catchup",
            "values_per_s",
            0,
            True,
            "≥5× DBOS",
            times(5),
        ),
        Row(
            "8",
            f"Admin changelist page 1 with {sizes.admin_rows:,} workflows, ms",
            "admin",
            "render_ms",
            0,
            False,
            "<300 ms",
            at_most(300),
        ),
        Row("8", "Admin changelist queries", "admin", "queries", 0, False),
        Row(
            "8",
            "Admin queries added from 1,000 to all rows",
            "admin",
            "query_growth",
            0,
            False,
            "0",
            at_most(0),
        ),
        *idle_rows(sizes),
    ]


def idle_rows(sizes: Sizes) -> list[Row]:
    """Item 9: the server's RSS growth per server, endpoint and number of idle clients."""
    rows = []
    for server in ("daphne", "uvicorn"):
        for kind, label in (("ws", "WebSocket"), ("sse", "SSE")):
            for clients in (1, sizes.idle_clients):
                rows.append(
                    Row(
                        "9",
                        f"Never-reading {label} clients on one {sizes.idle_values:,}-value "
                        f"stream ({server}, {clients}): RSS growth, MB",
                        "idle_readers",
                        f"{server}_{kind}_{clients}_mb",
                        1,
                        False,
                    )
                )
    return rows


def render_baseline(run: Run) -> str:
    """This tree against the baseline checkout, row by row: the change, better or worse."""
    assert run.baseline is not None
    pairs = [(DS_PG, BASE_SYSTEMS[DS_PG]), (DS_SQLITE, BASE_SYSTEMS[DS_SQLITE])]
    lines = [
        "",
        f"This tree against the baseline {run.baseline}, each workload run right after the "
        "other in every repeat. Change: positive is better; **worse** marks more than 10%.",
        "",
        "| # | measure | PostgreSQL | baseline | change | SQLite | baseline | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in build_rows(run):
        if row.workload in ("commit_rate", "floor"):
            continue
        by_system = cells(run, row.workload, row.metric)
        shown = []
        for mine, base in pairs:
            now, before = by_system.get(mine), by_system.get(base)
            shown += [c.show(row.digits) if c else "" for c in (now, before)]
            times = ratio(row, by_system, mine, base)
            if times is None:
                shown.append("")
            else:
                change = times - 1
                shown.append(f"{change:+.0%}" + (" **worse**" if change < -0.10 else ""))
        if any(shown):
            lines.append(f"| {row.item} | {row.label} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def render(run: Run, info: dict[str, Any], load: dict[str, Any]) -> str:
    rows = build_rows(run)
    systems = [DS_PG, DBOS, DS_SQLITE]
    header = (
        "| # | measure | "
        + " | ".join(SYSTEMS[s] for s in systems)
        + " | ours ÷ DBOS | target | verdict |"
    )
    lines = [header, "|" + "---|" * (len(systems) + 5)]
    for row in rows:
        by_system = cells(run, row.workload, row.metric)
        if row.metric == "lost":
            dup = cells(run, row.workload, "duplicated")
            by_system = {
                s: Cell([a + b for a, b in zip(c.values, dup[s].values)])
                for s, c in by_system.items()
            }
        if row.workload in ("commit_rate", "floor"):
            shown = [by_system.get("pg", Cell([])).show(row.digits), "", ""]
        else:
            shown = [by_system.get(s, Cell([])).show(row.digits) for s in systems]
            for i, s in enumerate(systems):
                error = run.errors.get(row.workload, {}).get(s)
                if error:
                    shown[i] = "failed"
        r = ratio(row, by_system)
        verdict = row.verdict(by_system) if row.verdict else None
        lines.append(
            f"| {row.item} | {row.label} | "
            + " | ".join(shown)
            + f" | {'' if r is None else f'{r:,.1f}×'} | {row.target} | {verdict or ''} |"
        )
    for workload in WORKLOADS:
        reason = run.skipped.get(workload.name)
        if reason:
            lines.append(
                f"| {workload.item} | {workload.title} | not measured: {reason} |"
                + " |" * (len(systems) + 2)
            )
    sizes = run.sizes
    notes = [
        "",
        "Cells: median over repeats (min–max). Ratios compare medians; "
        "for times, DBOS's value ÷ ours.",
        f"Repeats: {sizes.repeats} (throughput and catch-up: {min(sizes.repeats, 2)}; recovery, "
        f"fan-out and admin: 1). Sizes: append {sizes.append:,}, latency "
        f"{sizes.ticks} values 10 ms apart, throughput {sizes.workflows:,} workflows on 2 worker "
        f"processes (concurrency {sizes.concurrency} each, DBOS worker_concurrency "
        f"{sizes.dbos_concurrency}), {sizes.steps} steps in one workflow, recovery "
        f"{sizes.recovery} workflows × {sizes.recovery_steps} steps, catch-up {sizes.catchup:,} "
        "values."
        + (
            f" durable_streams lease: {sizes.lease_seconds:g} s (quick mode)."
            if sizes.lease_seconds
            else ""
        ),
        f"WebSocket items: write-to-browser {sizes.browser_ticks} values 10 ms apart through "
        f"daphne and channels-redis; fan-out {sizes.fanout_clients:,} sockets, 20 values/s for "
        f"{sizes.fanout_seconds:g} s; admin changelist with {sizes.admin_rows:,} workflows; "
        f"idle readers: values of 1 kB, each figure from a fresh server. "
        "Setup of each system: bench/README.md.",
        "",
        f"Machine: {info.get('nproc')} CPUs ({info.get('cpu', '?')}), "
        f"{info.get('memory_gb', '?')} GB RAM; PostgreSQL {info.get('postgresql')}; "
        f"SQLite {info.get('sqlite')}; Python {info.get('python')}; Django {info.get('django')}; "
        f"dbos {info.get('dbos')}; psycopg {info.get('psycopg')}.",
        f"Load: 1-min load average {load['load_start']:.2f} at the start, "
        f"{load['load_end']:.2f} at the end; the machine's CPUs were {load['busy_pct']:.0f}% "
        f"busy during the run: {load['ours_pct']:.0f}% this benchmark's processes, "
        f"{load['pg_pct']:.0f}% PostgreSQL (all databases), {load['others_pct']:.0f}% other work"
        f"{' (the machine was shared and busy)' if load['busy'] else ''}. "
        f"Run time {load['seconds']:.0f} s.",
    ]
    for workload, errors in run.errors.items():
        for system, error in errors.items():
            notes.append(f"Failed: {workload} on {system}: {error}")
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (<2 min)")
    parser.add_argument("--only", action="append", help="run only these workloads (repeatable)")
    parser.add_argument("--no-dbos", action="store_true", help="skip DBOS")
    parser.add_argument("--no-sqlite", action="store_true", help="skip durable_streams on SQLite")
    parser.add_argument("--repeats", type=int, help="override the number of repeats")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. a git worktree of the parent commit) whose durable_streams "
        "runs each workload right after this tree's; adds a before/after table",
    )
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats})
    systems = {DS_PG, DBOS, DS_SQLITE}
    if args.no_dbos:
        systems.discard(DBOS)
    if args.no_sqlite:
        systems.discard(DS_SQLITE)
    if DBOS in systems and not _has_dbos():
        print("dbos is not installed: pip install -e '.[bench]'; running without DBOS.")
        systems.discard(DBOS)
    if args.baseline:
        args.baseline = args.baseline.resolve()
        check_baseline(args.baseline)
        systems |= {BASE_SYSTEMS[s] for s in systems if s in BASE_SYSTEMS}

    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ds-bench-"))
    run = Run(sizes, args.quick, workdir / "ds_bench.sqlite3", RESULTS / "latest.log")
    run.baseline = args.baseline
    run.log.write_text("")
    workloads = []
    for workload in WORKLOADS:
        if args.only and workload.name not in args.only:
            continue
        reason = workload.unavailable()
        if reason:
            run.skipped[workload.name] = reason
            continue
        workloads.append(workload)

    info = machine()
    load_start = os.getloadavg()[0]
    busy0, total0 = cpu_times()
    own0 = own_cpu()
    pg0 = postgres_cpu()
    started = time.monotonic()
    print(
        f"Machine: {info.get('nproc')} CPUs, {info.get('memory_gb')} GB, PostgreSQL "
        f"{info.get('postgresql')}, load {load_start:.2f}. Systems: {', '.join(sorted(systems))}.",
        flush=True,
    )
    try:
        set_up(run, systems | {"pg"})
        execute(run, workloads, systems)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    busy1, total1 = cpu_times()
    busy_pct = 100 * (busy1 - busy0) / max(total1 - total0, 1e-9)
    ours_pct = 100 * (own_cpu() - own0) / max(total1 - total0, 1e-9)
    pg_pct = 100 * (postgres_cpu() - pg0) / max(total1 - total0, 1e-9)
    load = {
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "busy_pct": busy_pct,
        "ours_pct": ours_pct,
        "pg_pct": pg_pct,
        "others_pct": max(busy_pct - ours_pct - pg_pct, 0.0),
        # Other work took more than a fifth of the machine (PostgreSQL counted as ours).
        "busy": busy_pct - ours_pct - pg_pct > 20,
        "seconds": time.monotonic() - started,
    }
    table = render(run, info, load)
    if run.baseline is not None:
        table += render_baseline(run)
    print()
    print(table)
    (RESULTS / "latest.md").write_text(table)
    (RESULTS / "latest.json").write_text(
        json.dumps(
            {"machine": info, "load": load, "sizes": sizes.__dict__, "results": run.results},
            indent=1,
            default=str,
        )
    )
    print(f"Written to {RESULTS / 'latest.md'} (raw results: latest.json, logs: latest.log).")
    return 1 if run.errors else 0


def _has_dbos() -> bool:
    try:
        import dbos  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
