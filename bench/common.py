"""Helpers shared by the orchestrator and the workload processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "
READY_PREFIX = "BENCH_READY"


class BenchError(Exception):
    """A workload could not produce its measurement."""


def emit_result(result: dict[str, Any]) -> None:
    """Hand a workload's measurements to the orchestrator (one line on stdout)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def emit_ready(detail: str = "") -> None:
    sys.stdout.write(f"{READY_PREFIX} {detail}\n")
    sys.stdout.flush()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def wait_until(
    condition: Callable[[], Any], limit: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``condition`` until it returns something truthy; BenchError after ``limit`` s."""
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {limit:.0f}s waiting for {what}")
        time.sleep(interval)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


class Child:
    """A helper process of a workload (a worker, a reader), always reaped."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        quiet: bool = False,
        log: str | None = None,
    ) -> None:
        """``quiet``: nobody reads the output, which goes to the file ``log`` or nowhere."""
        self.args = [sys.executable, *args]
        # A child whose output nobody reads must not write to a pipe: it would block.
        sink: Any = subprocess.DEVNULL
        if quiet and log:
            sink = open(log, "a")  # noqa: SIM115 (the child holds it; closed below)
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=child_env(env),
            stdout=sink if quiet else subprocess.PIPE,
            stderr=(subprocess.STDOUT if log else subprocess.DEVNULL) if quiet else None,
            text=True,
        )
        if sink is not subprocess.DEVNULL:
            sink.close()  # the child has its own copy

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, limit: float = 60.0) -> str:
        """Read stdout until the child says it is ready; return what it said."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(f"{self.args[1:]} exited with {self.proc.wait()} before ready")
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip()
        raise BenchError(f"{self.args[1:]} was not ready within {limit:.0f}s")

    def result(self, limit: float) -> dict[str, Any]:
        """Wait for the child's result line and its exit."""
        assert self.proc.stdout is not None
        try:
            out, _ = self.proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.args[1:]} did not finish within {limit:.0f}s") from None
        return parse_result(out, self.args[1:], self.proc.returncode)

    def sigkill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def parse_result(out: str, what: object, returncode: int | None) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise BenchError(f"{what} exited with {returncode} without a result")


def stop_all(children: Iterable[Child | None]) -> None:
    for child in children:
        if child is not None:
            child.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan
