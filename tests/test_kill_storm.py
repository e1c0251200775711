"""A kill storm: 200 streaming workflows on three real ``runworkers`` processes, one of which
is SIGKILLed every 1-2 s (20 to 24 times) and replaced by a fresh one. Then the killing stops
and the test waits, bounded, for every run to end, and checks the result value by value.

The workflow (tests/workflows_storm.py) writes ``["body", 0, None]``, then for each step k a
non-atomic step that writes ``["step", k, token, j]`` for j = 0..V-1 while it runs, every second
step an atomic step that creates one row and writes ``["atomic", k, token]``, and
``["body", k + 1, token of step k]``; then it closes the stream. ``token`` is unique to one
execution of a step, which also returns it: the checkpoint records the token of the execution
whose result the workflow used. Each execution journals its start and end in an ``O_APPEND``
file.

What is asserted, for every workflow:

- it ended SUCCESS within the bounded drain (no run is stuck), with the recorded tokens as its
  output, and exactly the checkpoints its body makes, at the expected operation numbers;
- body values (README: exactly once from the workflow body): ``["body", i, ...]`` appears once
  for each i in 0..S, in order, each written under its own operation number, each (but the
  first) carrying the token recorded for step i - 1;
- step values (README: "Writes from a step", at least once): between body values k and k + 1
  the stream holds one or more *attempts* of step k, an attempt being the values of one
  execution (one token), contiguous and in order from j = 0. Every attempt but the last may
  be cut short (its worker died while it wrote); the last is whole and its token is the
  recorded one; no token appears in two attempts, and every token is one the journal saw
  start for that very step. So values repeat only as whole attempts (or a killed attempt's
  prefix), never singly, never out of order, never after the step's checkpoint;
- atomic steps (README: exactly once): one row and one stream value each, with the recorded
  token, however many executions the journal saw start (killed ones rolled back);
- no step ran again once its checkpoint was recorded. The check: for the recorded token T
  of step k, the journal must hold T's start and end; no other execution of step k may have
  started after T ended while its worker held the workflow's lease. Each execution reads the
  clock, then checks that its worker holds the lease (``held``). T's checkpoint committed
  after T ended, fenced by T's lease; another run of the workflow either claimed it before
  that commit (then its lease was lost before T ended, and an execution it starts after T's
  end reads ``held`` false), or claimed it after the commit, and then it loaded the
  checkpoint and must not run the step. Runs of one workflow never overlap in one worker
  (a worker never claims a workflow it is still running), and steps here have no retries.
  So the check cannot fail for a correct runtime, and fails when a replay runs a recorded
  step again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction

from durable_streams import Status
from durable_streams.models import TERMINAL_STATUSES, Step, Stream, StreamEntry, Workflow
from tests.models import Effect
from tests.processes import WorkerProcess, WorkerProcesses, worker_processes
from tests.waiting import poll
from tests.workflows_storm import ATOMIC_STEP, STREAM, STREAM_STEP, has_atomic, storm

ON_POSTGRES = bool(os.environ.get("DATABASE_URL"))

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults, pytest.mark.timeout(280)]

WORKFLOWS = 200
WORKERS = 3
CONCURRENCY = 4
LEASE_SECONDS = 2.0
STEPS = 5  # non-atomic steps per workflow
VALUES = 3  # stream values per step execution
STEP_SECONDS = 0.5  # how long a step runs, spread between its writes
ATOMIC_EVERY = 2  # an atomic step after every second step
# On SQLite an atomic step holds the database's write lock while it runs: keep it short.
ATOMIC_SECONDS = 0.1 if ON_POSTGRES else 0.005
MIN_KILLS, MAX_KILLS = 20, 24
KILL_INTERVAL = (1.0, 2.0)
STORM_SECONDS = 60.0  # the killing stops after MAX_KILLS kills or this long
DRAIN_SECONDS = 100.0  # then every run must end within this


@pytest.fixture
def processes(transactional_db: None, tmp_path: Path) -> Iterator[WorkerProcesses]:
    with worker_processes(tmp_path) as started:
        yield started


@dataclass
class Storm:
    seed: int
    kills: list[tuple[str, int]] = field(default_factory=list)  # (worker, leases it held)
    started: float = field(default_factory=time.monotonic)
    storm_seconds: float = 0.0
    drain_seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        stats = ", ".join(f"{name} {value}" for name, value in self.stats.items())
        return (
            f"kill storm ({'PostgreSQL' if ON_POSTGRES else 'SQLite'}, seed {self.seed}): "
            f"{len(self.kills)} kills hitting {sum(held for _, held in self.kills)} leases, "
            f"storm {self.storm_seconds:.1f}s, drain {self.drain_seconds:.1f}s, "
            f"total {time.monotonic() - self.started:.1f}s; {stats}"
        )


def started(worker: WorkerProcess) -> bool:
    return f"Worker {worker.worker_id} started" in worker.log()


def unfinished() -> int:
    return Workflow.objects.filter(name=storm.name).exclude(status__in=TERMINAL_STATUSES).count()


def start_worker(processes: WorkerProcesses, number: int) -> WorkerProcess:
    return processes.start(
        f"storm-{number}", lease_seconds=LEASE_SECONDS, concurrency=CONCURRENCY, wait_started=False
    )


def run_storm(processes: WorkerProcesses, result: Storm, path: Path) -> list[WorkerProcess]:
    """Kill a random started worker every 1-2 s, replacing each; return the live workers."""
    rng = random.Random(result.seed)
    live = [start_worker(processes, n) for n in range(WORKERS)]
    for worker in live:
        worker.wait_started()
    with transaction.atomic():  # one commit: all the work appears at once
        for _ in range(WORKFLOWS):
            storm.start(str(path), STEPS, VALUES, STEP_SECONDS, ATOMIC_EVERY, ATOMIC_SECONDS)
    began = time.monotonic()
    number = WORKERS
    while len(result.kills) < MAX_KILLS and time.monotonic() - began < STORM_SECONDS:
        time.sleep(rng.uniform(*KILL_INTERVAL))  # the storm's pace, not a wait for a result
        for worker in live:
            assert worker.returncode is None, f"{worker!r} exited on its own:\n{worker.log()}"
        if not unfinished():
            break
        candidates = [worker for worker in live if started(worker)]
        if not candidates:
            continue
        victim = rng.choice(candidates)
        held = Workflow.objects.filter(status=Status.RUNNING, lease_owner=victim.worker_id).count()
        victim.send(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        result.kills.append((victim.worker_id, held))
        live.remove(victim)
        live.append(start_worker(processes, number))
        number += 1
    result.storm_seconds = time.monotonic() - began
    return live


# The journal


@dataclass
class Run:
    """One execution of a step, as its worker journaled it."""

    kind: str
    wid: str
    k: int
    token: str
    worker: str
    held: bool
    start: int
    end: int | None = None


def read_journal(path: Path, problems: list[str]) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"journal line {number} is not JSON: {line!r}")
            continue
        token = entry["token"]
        if entry["event"] == "start":
            if token in runs:
                problems.append(f"journal line {number}: token {token} started twice")
            runs[token] = Run(
                entry["kind"],
                entry["wid"],
                entry["k"],
                token,
                entry["worker"],
                entry["held"],
                entry["t"],
            )
        elif token not in runs or runs[token].end is not None:
            problems.append(f"journal line {number}: an end without its start: {line}")
        else:
            runs[token].end = entry["t"]
    return runs


# What the workflow's body does, operation by operation


def layout() -> tuple[dict[tuple[str, int], int], dict[int, int], int]:
    """(kind, k) -> operation of each step, i -> operation of body value i, the close's."""
    steps: dict[tuple[str, int], int] = {}
    body = {0: 0}
    operation = 1
    for k in range(STEPS):
        steps["stream", k] = operation
        operation += 1
        if has_atomic(k, ATOMIC_EVERY):
            steps["atomic", k] = operation
            operation += 1
        body[k + 1] = operation
        operation += 1
    return steps, body, operation


KINDS = {STREAM_STEP: "stream", ATOMIC_STEP: "atomic"}


def recorded_tokens(problems: list[str]) -> dict[str, dict[tuple[str, int], str]]:
    """wid -> (kind, k) -> the token its checkpoint recorded; every checkpoint as expected."""
    expected, _, _ = layout()
    tokens: dict[str, dict[tuple[str, int], str]] = defaultdict(dict)
    rows = Step.objects.filter(workflow__name=storm.name).values_list(
        "workflow_id", "operation", "name", "status", "output"
    )
    for wid, operation, name, status, output in rows:
        value: dict[str, Any] = json.loads(output) if output else {}
        key = (KINDS.get(name, name), value.get("k", -1))
        if status != Step.Outcome.SUCCESS or expected.get(key) != operation:
            problems.append(f"{wid}: unexpected checkpoint #{operation} {name} {status} {output}")
        elif key in tokens[wid]:
            problems.append(f"{wid}: two checkpoints of {key}")
        else:
            tokens[wid][key] = value["token"]
    return tokens


def check_stream(
    wid: str,
    entries: list[tuple[int, Any, int | None]],
    tokens: dict[tuple[str, int], str],
    journal: dict[str, Run],
    counts: Counter[str],
) -> list[str]:
    """The grammar of the module docstring, value by value."""
    _, body_operations, _ = layout()
    problems: list[str] = []
    if [offset for offset, _, _ in entries] != list(range(len(entries))):
        return [f"{wid}: offsets are not 0..{len(entries) - 1}"]
    position = 0

    def found() -> str:
        return repr(entries[position][1]) if position < len(entries) else "the end"

    def take(expected: list[Any], operation: int | None) -> bool:
        nonlocal position
        if position >= len(entries) or entries[position][1] != expected:
            problems.append(f"{wid} offset {position}: expected {expected!r}, found {found()}")
            return False
        if entries[position][2] != operation:
            problems.append(
                f"{wid} offset {position}: {expected!r} written under operation "
                f"{entries[position][2]}, expected {operation}"
            )
        position += 1
        return True

    if not take(["body", 0, None], body_operations[0]):
        return problems
    for k in range(STEPS):
        recorded = tokens.get(("stream", k))
        attempts: list[tuple[str, list[int]]] = []
        while position < len(entries):
            value = entries[position][1]
            if not (isinstance(value, list) and len(value) == 4 and value[:2] == ["step", k]):
                break
            if entries[position][2] is not None:
                problems.append(f"{wid} offset {position}: a step's value has an operation")
            token, j = value[2], value[3]
            if not attempts or attempts[-1][0] != token:
                attempts.append((token, []))
            attempts[-1][1].append(j)
            position += 1
        if not attempts:
            problems.append(f"{wid} offset {position}: no value of step {k}, found {found()}")
            return problems
        seen = Counter(token for token, _ in attempts)
        for token, js in attempts:
            run = journal.get(token)
            if run is None or (run.wid, run.kind, run.k) != (wid, "stream", k):
                problems.append(f"{wid}: values of step {k} from {token}, not an execution of it")
            if seen[token] > 1:
                problems.append(f"{wid}: step {k}'s execution {token} is split in {seen[token]}")
            if js != list(range(len(js))):
                problems.append(f"{wid}: step {k}'s execution {token} wrote j = {js}")
        last_token, last_js = attempts[-1]
        if last_token != recorded or last_js != list(range(VALUES)):
            problems.append(
                f"{wid}: the last attempt of step {k} is {last_token} j = {last_js}, not the "
                f"whole attempt of the recorded {recorded}"
            )
        counts["attempts in streams"] += len(attempts)
        counts["attempts cut short"] += sum(len(js) < VALUES for _, js in attempts)
        counts["whole attempts repeated"] += sum(len(js) == VALUES for _, js in attempts[:-1])
        if has_atomic(k, ATOMIC_EVERY) and not take(["atomic", k, tokens.get(("atomic", k))], None):
            return problems
        if not take(["body", k + 1, recorded], body_operations[k + 1]):
            return problems
    if position != len(entries):
        problems.append(f"{wid} offset {position}: a value after the last one: {found()}")
    return problems


def check_runs(path: Path, result: Storm) -> dict[str, list[str]]:
    """Every check of the module docstring; returns the problems found, by kind."""
    problems: dict[str, list[str]] = defaultdict(list)
    journal = read_journal(path, problems["journal"])
    tokens = recorded_tokens(problems["checkpoints"])
    steps, _, close_operation = layout()
    runs = list(Workflow.objects.filter(name=storm.name).values_list("pk", "status", "attempts"))
    outputs = dict(Workflow.objects.filter(name=storm.name).values_list("pk", "output"))
    ids = [pk for pk, _, _ in runs]
    if len(ids) != WORKFLOWS:
        problems["runs"].append(f"{len(ids)} workflows instead of {WORKFLOWS}")
    for pk, status, _ in runs:
        if status != Status.SUCCESS:
            error = json.loads(Workflow.objects.get(pk=pk).error or "{}")
            problems["runs"].append(
                f"{pk} ended {status}: {error.get('type')}: {error.get('message')}"
            )
        elif json.loads(outputs[pk]) != [tokens[pk].get(("stream", k)) for k in range(STEPS)]:
            problems["runs"].append(f"{pk}: output {outputs[pk]} is not the recorded tokens")
        if set(tokens[pk]) != set(steps):
            problems["checkpoints"].append(
                f"{pk}: checkpoints of {sorted(tokens[pk])}, not of {sorted(steps)}"
            )

    entries: dict[str, list[tuple[int, Any, int | None]]] = defaultdict(list)
    rows = StreamEntry.objects.filter(stream__workflow__name=storm.name, stream__key=STREAM)
    for wid, offset, value, operation in rows.order_by("stream_id", "offset").values_list(
        "stream__workflow_id", "offset", "value", "operation"
    ):
        entries[wid].append((offset, json.loads(value), operation))
    streams = {
        s.workflow_id: s for s in Stream.objects.filter(workflow__name=storm.name, key=STREAM)
    }
    counts: Counter[str] = Counter()
    for wid in ids:
        problems["streams"] += check_stream(wid, entries[wid], tokens[wid], journal, counts)
        stream = streams.get(wid)
        state = (
            None
            if stream is None
            else (stream.length, stream.close_operation, stream.closed_by_end)
        )
        if state != (len(entries[wid]), close_operation, False):
            problems["streams"].append(
                f"{wid}: stream (length, close operation, closed by end) {state}, not "
                f"({len(entries[wid])}, {close_operation}, False)"
            )

    effects: dict[tuple[str, str], list[str]] = defaultdict(list)
    for wid, label, token in Effect.objects.values_list("workflow_id", "label", "worker"):
        effects[wid, label].append(token)
    atomic_keys = {
        (wid, f"storm-atomic-{k}") for wid in ids for kind, k in steps if kind == "atomic"
    }
    for wid, label in sorted(atomic_keys | set(effects)):
        recorded = tokens[wid].get(("atomic", int(label.rsplit("-", 1)[1])))
        if effects[wid, label] != [recorded]:
            problems["atomic steps"].append(
                f"{wid}: {label} rows {effects[wid, label]}, not [{recorded}]"
            )

    # No step ran again after its checkpoint (see the module docstring for why this is exact).
    by_step: dict[tuple[str, str, int], list[Run]] = defaultdict(list)
    for run in journal.values():
        by_step[run.wid, run.kind, run.k].append(run)
    for wid, recorded_steps in tokens.items():
        for (kind, k), token in recorded_steps.items():
            run = journal.get(token)
            if run is None or run.end is None or (run.wid, run.kind, run.k) != (wid, kind, k):
                problems["steps run again"].append(
                    f"{wid}: the recorded {kind} step {k} ({token}) never ran whole"
                )
                continue
            for other in by_step[wid, kind, k]:
                if other.token == token or other.start <= run.end:
                    continue
                if other.held:
                    problems["steps run again"].append(
                        f"{wid}: {kind} step {k} ran again ({other.token} on {other.worker}, "
                        f"holding the lease) {(other.start - run.end) / 1e6:.0f} ms after the "
                        f"recorded execution {token} on {run.worker} ended"
                    )
                else:
                    counts["late executions without the lease"] += 1
    for kind in ("stream", "atomic"):
        total = sum(1 for run in journal.values() if run.kind == kind)
        calls = sum(1 for key in by_step if key[1] == kind)
        result.stats[f"{kind} step executions"] = f"{total} for {calls} steps"
        counts[f"{kind} steps run more than once"] = sum(
            1 for key, started in by_step.items() if key[1] == kind and len(started) > 1
        )
    counts["executions without the lease"] = sum(not run.held for run in journal.values())
    attempts = [attempts for _, _, attempts in runs]
    result.stats["reclaims"] = sum(attempts) - len(attempts)
    result.stats["most attempts"] = max(attempts, default=0)
    result.stats.update(counts)
    return problems


def report(problems: dict[str, list[str]]) -> str:
    lines = []
    for kind, found in problems.items():
        if found:
            lines.append(f"{len(found)} problems with {kind}, the first ones:")
            lines += [f"  {problem}" for problem in found[:6]]
    return "\n".join(lines)


def test_kill_storm_loses_and_duplicates_nothing(
    processes: WorkerProcesses, tmp_path: Path
) -> None:
    result = Storm(seed=int(os.environ.get("DS_STORM_SEED") or random.randrange(10**6)))
    path = tmp_path / "journal.jsonl"
    live = run_storm(processes, result, path)

    drain_began = time.monotonic()
    poll(lambda: not unfinished(), timeout=DRAIN_SECONDS, interval=0.25)
    result.drain_seconds = time.monotonic() - drain_began
    stuck = list(
        Workflow.objects.filter(name=storm.name)
        .exclude(status__in=TERMINAL_STATUSES)
        .values_list("pk", "status", "attempts", "lease_owner", "lease_expires_at")
    )
    assert not stuck, (
        f"{result.summary()}\n{len(stuck)} runs still not ended {DRAIN_SECONDS}s after the "
        f"storm: {stuck[:10]}\n" + "\n".join(f"--- {w!r}\n{w.log()[-3000:]}" for w in live)
    )

    problems = check_runs(path, result)
    logs = processes.logs()
    result.stats["tracebacks in worker logs"] = logs.count("Traceback")
    summary = result.summary()
    print(f"\n{summary}")
    if "Traceback" in logs:  # not a failure by itself (a worker may log a retried error)
        at = logs.index("Traceback")
        print("The first traceback in the worker logs:\n" + logs[max(0, at - 300) : at + 2500])
    found = any(problems.values())
    assert not found, f"{summary}\n{report(problems)}"
    # The storm really stormed: enough kills, landing on running workflows.
    assert len(result.kills) >= MIN_KILLS, f"the work ran out: {summary}"
    assert result.stats["reclaims"] >= 10, summary
    assert result.stats["stream steps run more than once"] >= 10, summary

    # The survivors are healthy: they stop cleanly on SIGTERM.
    for worker in live:
        assert worker.returncode is None, f"{worker!r} exited on its own:\n{worker.log()}"
        worker.send(signal.SIGTERM)
    for worker in live:
        assert worker.wait(30) == 0, worker.log()
