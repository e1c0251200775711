from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand
from django.db.models import Count, Max, Min
from django.utils import timezone

from durable_streams.conf import get_config
from durable_streams.db import alias
from durable_streams.models import Status, WorkerProcess, Workflow
from durable_streams.models.workers import GONE_AFTER_BEATS


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return f"in {-seconds:.0f}s"
    return f"{seconds:.0f}s ago"


class Command(BaseCommand):
    help = (
        "Show durable_streams' queues (enqueued and running runs, the oldest waiting), the "
        "runs by status, the live workers (with their last heartbeat and the runs they hold), "
        "the workers presumed gone, and the holders of leases that no live worker renews."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--json", action="store_true", dest="as_json", help="Print one JSON object."
        )

    def handle(self, *, as_json: bool, **options: Any) -> None:
        report = self.report()
        if as_json:
            self.stdout.write(_dumps(report))
        else:
            self.stdout.write(self.render(report))

    def report(self) -> dict[str, Any]:
        now = timezone.now()
        runs = Workflow.objects.using(alias())
        by_status = dict(
            runs.order_by().values_list("status").annotate(n=Count("pk")).values_list("status", "n")
        )
        queues: dict[str, dict[str, Any]] = {}
        active = (
            runs.active()
            .order_by()
            .values("queue", "status")
            .annotate(n=Count("pk"), oldest=Min("created_at"))
        )
        for row in active:
            queue = queues.setdefault(
                row["queue"], {"enqueued": 0, "running": 0, "oldest_enqueued": None}
            )
            if row["status"] == Status.ENQUEUED:
                queue["enqueued"] = row["n"]
                queue["oldest_enqueued"] = row["oldest"]
            else:
                queue["running"] = row["n"]
        lease = timedelta(seconds=get_config().LEASE_SECONDS)
        leases = []
        held = (
            runs.filter(status=Status.RUNNING, lease_owner__isnull=False)
            .order_by()
            .values("lease_owner")
            .annotate(n=Count("pk"), expires=Max("lease_expires_at"))
            .order_by("lease_owner")
        )
        for lease_row in held:
            expires = lease_row["expires"]
            leases.append(
                {
                    "worker_id": lease_row["lease_owner"],
                    "running": lease_row["n"],
                    # Renewals push the lease LEASE_SECONDS ahead.
                    "last_renewal": None if expires is None else expires - lease,
                    "lease_expires_at": expires,
                    "alive": expires is not None and expires > now,
                }
            )
        running_of = {row["worker_id"]: row["running"] for row in leases}
        workers: list[dict[str, Any]] = []
        gone: list[dict[str, Any]] = []
        for process in WorkerProcess.objects.using(alias()).order_by("worker_id"):
            alive = process.is_alive(now)
            (workers if alive else gone).append(
                {
                    "worker_id": process.worker_id,
                    "hostname": process.hostname,
                    "pid": process.pid,
                    "queues": process.queue_list,
                    "concurrency": process.concurrency,
                    "workflows": len(process.workflow_names),
                    "workflows_complete": process.workflows_complete,
                    "started_at": process.started_at,
                    "last_heartbeat": process.heartbeat_at,
                    "heartbeat_age_seconds": round((now - process.heartbeat_at).total_seconds(), 3),
                    "running": running_of.get(process.worker_id, 0),
                    "alive": alive,
                }
            )
        live_ids = {worker["worker_id"] for worker in workers}
        return {
            "now": now,
            "statuses": {status: by_status.get(status, 0) for status in Status.values},
            "queues": dict(sorted(queues.items())),
            "workers": workers,
            "gone_workers": gone,
            # Runs held by a worker with no live row: killed, or of a version before the table.
            "unlisted_leases": [row for row in leases if row["worker_id"] not in live_ids],
        }

    def render(self, report: dict[str, Any]) -> str:
        now = report["now"]
        lines = [
            "Runs: "
            + ", ".join(f"{n} {status.lower()}" for status, n in report["statuses"].items())
        ]
        lines.append("")
        if report["queues"]:
            lines.append(f"{'queue':<24} {'enqueued':>9} {'running':>8}  oldest enqueued")
            for name, queue in report["queues"].items():
                lines.append(
                    f"{name:<24} {queue['enqueued']:>9} {queue['running']:>8}  "
                    f"{_ago(queue['oldest_enqueued'], now)}"
                )
        else:
            lines.append("No queue has enqueued or running runs.")
        lines.append("")
        heading = (
            f"{'worker':<40} {'host':<20} {'pid':>7}  {'queues':<20} {'conc.':>5} "
            f"{'running':>7}  last heartbeat"
        )
        if report["workers"]:
            lines.append(f"Live workers: {len(report['workers'])}")
            lines.append(heading)
            lines.extend(_worker_line(worker, now) for worker in report["workers"])
        else:
            lines.append("No live worker: no runworkers process has beaten its heartbeat lately.")
        if report["gone_workers"]:
            lines.append("")
            lines.append(
                f"Presumed gone (no heartbeat for {_gone_after()}s; a live worker removes "
                f"them): {len(report['gone_workers'])}"
            )
            lines.append(heading)
            lines.extend(_worker_line(worker, now) for worker in report["gone_workers"])
        if report["unlisted_leases"]:
            lines.append("")
            lines.append(
                f"{'runs held by a worker not listed alive':<40} {'running':>8}  last lease renewal"
            )
            for row in report["unlisted_leases"]:
                state = "" if row["alive"] else "  lease expired: its runs will be resumed"
                lines.append(
                    f"{row['worker_id']:<40} {row['running']:>8}  "
                    f"{_ago(row['last_renewal'], now)}{state}"
                )
        return "\n".join(lines)


def _gone_after() -> str:
    return f"{GONE_AFTER_BEATS * get_config().WORKER_HEARTBEAT_SECONDS:g}"


def _worker_line(worker: dict[str, Any], now: datetime) -> str:
    queues = ",".join(worker["queues"])
    return (
        f"{worker['worker_id']:<40} {worker['hostname']:<20} {worker['pid']:>7}  "
        f"{queues:<20} {worker['concurrency']:>5} {worker['running']:>7}  "
        f"{_ago(worker['last_heartbeat'], now)}"
    )


def _dumps(report: dict[str, Any]) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        raise TypeError(type(value).__name__)

    return json.dumps(report, default=default, sort_keys=True)
