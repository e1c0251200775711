from __future__ import annotations

import argparse
import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from durable_streams import telemetry
from durable_streams.db import alias
from durable_streams.exceptions import SchemaMissing
from durable_streams.schema import require_schema
from durable_streams.worker import Worker

VERBOSITY_TO_LEVEL = {
    0: logging.ERROR,
    1: logging.INFO,
    2: logging.DEBUG,
    3: logging.DEBUG,
}


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def non_empty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


class Command(BaseCommand):
    help = "Run durable_streams workflows: claim them from the queues and run them to the end."
    worker_class = Worker

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--concurrency",
            type=positive_int,
            default=4,
            help="Workflows run at once by this process (default: %(default)r).",
        )
        parser.add_argument(
            "--queue",
            dest="queues",
            action="append",
            type=non_empty,
            metavar="NAME",
            help="A queue to take work from; repeat for several (default: 'default').",
        )
        parser.add_argument(
            "--burst",
            action="store_true",
            help="Exit once no work is left instead of waiting for more.",
        )
        parser.add_argument(
            "--worker-id",
            type=non_empty,
            default=None,
            help="Name of this worker in leases and logs (default: host-pid-random).",
        )

    def handle(
        self,
        *,
        concurrency: int,
        queues: list[str] | None,
        burst: bool,
        worker_id: str | None,
        verbosity: int,
        **options: Any,
    ) -> None:
        self._configure_logging(verbosity)
        try:
            require_schema(alias())
        except SchemaMissing as exc:
            raise CommandError(str(exc)) from None
        worker = self.worker_class(
            queues=queues or ["default"],
            concurrency=concurrency,
            burst=burst,
            worker_id=worker_id,
            handle_signals=True,
        )
        telemetry.observe_queue_depth(queues or ["default"])
        worker.run()

    def _configure_logging(self, verbosity: int) -> None:
        logger = logging.getLogger("durable_streams")
        logger.setLevel(VERBOSITY_TO_LEVEL.get(verbosity, logging.DEBUG))
        if not logger.handlers and not logging.getLogger().handlers:
            # The wrapped stream; django-stubs do not declare OutputWrapper._out.
            handler = logging.StreamHandler(self.stderr._out)  # type: ignore[call-overload]
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
            )
            logger.addHandler(handler)
