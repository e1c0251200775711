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
from durable_streams.models import Status, Workflow


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
        "runs by status, and the workers holding runs with their last lease renewal."
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
        workers = []
        held = (
            runs.filter(status=Status.RUNNING, lease_owner__isnull=False)
            .order_by()
            .values("lease_owner")
            .annotate(n=Count("pk"), expires=Max("lease_expires_at"))
            .order_by("lease_owner")
        )
        for lease_row in held:
            expires = lease_row["expires"]
            workers.append(
                {
                    "worker_id": lease_row["lease_owner"],
                    "running": lease_row["n"],
                    # Renewals push the lease LEASE_SECONDS ahead.
                    "last_renewal": None if expires is None else expires - lease,
                    "lease_expires_at": expires,
                    "alive": expires is not None and expires > now,
                }
            )
        return {
            "now": now,
            "statuses": {status: by_status.get(status, 0) for status in Status.values},
            "queues": dict(sorted(queues.items())),
            "workers": workers,
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
        if report["workers"]:
            lines.append(f"{'worker (holding runs)':<40} {'running':>8}  last lease renewal")
            for worker in report["workers"]:
                state = "" if worker["alive"] else "  lease expired: its runs will be resumed"
                lines.append(
                    f"{worker['worker_id']:<40} {worker['running']:>8}  "
                    f"{_ago(worker['last_renewal'], now)}{state}"
                )
        else:
            lines.append("No worker holds a run (idle workers hold no lease and are not listed).")
        return "\n".join(lines)


def _dumps(report: dict[str, Any]) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        raise TypeError(type(value).__name__)

    return json.dumps(report, default=default, sort_keys=True)
