from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from durable_streams.conf import MAXIMA, get_config
from durable_streams.db import alias
from durable_streams.models import Workflow


def days(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days") from None
    if not 0 <= number <= MAXIMA["RETENTION_DAYS"]:
        raise argparse.ArgumentTypeError(
            f"must be from 0 to {MAXIMA['RETENTION_DAYS']} days, not {value}"
        )
    return number


def batch_size(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= number <= 100_000:
        raise argparse.ArgumentTypeError(f"must be from 1 to 100000, not {number}")
    return number


class Command(BaseCommand):
    help = (
        "Delete ended workflow runs (SUCCESS, ERROR, CANCELLED) older than a number of days, "
        "with their steps and streams, in small batches."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--older-than",
            type=days,
            metavar="DAYS",
            help="Delete runs that ended more than DAYS days ago "
            "(default: settings.DURABLE_STREAMS['RETENTION_DAYS']).",
        )
        parser.add_argument(
            "--batch-size",
            type=batch_size,
            default=500,
            help="Runs deleted per transaction (default: %(default)r).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count what would be deleted, delete nothing.",
        )

    def handle(
        self,
        *,
        older_than: float | None,
        batch_size: int,
        dry_run: bool,
        **options: Any,
    ) -> None:
        if older_than is None:
            older_than = get_config().RETENTION_DAYS
        if older_than is None:
            raise CommandError(
                "Say how old an ended run must be to go: --older-than DAYS, or "
                "settings.DURABLE_STREAMS['RETENTION_DAYS']."
            )
        cutoff = timezone.now() - timedelta(days=older_than)
        runs = Workflow.objects.using(alias()).ended_before(cutoff)
        if dry_run:
            self.stdout.write(
                f"{runs.count()} runs ended before {cutoff:%Y-%m-%d %H:%M:%S %Z} would be deleted."
            )
            return
        total_runs = total_values = 0
        while True:
            deleted, values = runs.delete_batch(batch_size)
            if not deleted:
                break
            total_runs += deleted
            total_values += values
            if options["verbosity"] >= 2:
                self.stdout.write(f"Deleted {deleted} runs ({values} stream values).")
        self.stdout.write(
            f"Deleted {total_runs} runs that ended before {cutoff:%Y-%m-%d %H:%M:%S %Z}, "
            f"with {total_values} stream values."
        )
