"""``python manage.py demo``: the whole example on 127.0.0.1 in one command."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

HOST = "127.0.0.1"
# Seconds each process gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0
START_TIMEOUT = 30.0


def port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, not {port}")
    return port


def listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Command(BaseCommand):
    help = (
        "Run the demo: apply migrations, then start a worker process and an ASGI server "
        f"on {HOST}; Ctrl-C stops both."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--port", type=port_number, default=8000, help="Port of the web server (8000)."
        )

    def handle(self, *, port: int, verbosity: int, **options: Any) -> None:
        if listening(port):
            raise CommandError(f"Port {port} on {HOST} is in use; pick another with --port.")
        call_command("migrate", interactive=False, verbosity=max(verbosity - 1, 0))
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {
            signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)
        }
        children: list[tuple[str, subprocess.Popen[bytes]]] = []
        failure = ""
        try:
            children.append(("worker", self._spawn(["-m", "django", "runworkers"])))
            application = settings.ASGI_APPLICATION.rpartition(".")
            children.append(
                (
                    "web server",
                    self._spawn(
                        [
                            "-m",
                            "daphne",
                            "--bind",
                            HOST,
                            "--port",
                            str(port),
                            f"{application[0]}:{application[2]}",
                        ]
                    ),
                )
            )
            deadline = time.monotonic() + START_TIMEOUT
            while not stop.is_set() and not listening(port):
                failure = self._exited(children)
                if failure or time.monotonic() > deadline:
                    failure = failure or f"The web server did not listen within {START_TIMEOUT}s."
                    break
                stop.wait(0.1)
            if not failure and not stop.is_set():
                self.stdout.write(
                    self.style.SUCCESS(f"The demo runs at http://{HOST}:{port}/")
                    + "  (admin: /admin/, Ctrl-C to stop)"
                )
                self.stdout.flush()
            while not failure and not stop.is_set():
                failure = self._exited(children)
                stop.wait(0.2)
        finally:
            self._stop(children)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if failure:
            raise CommandError(failure)
        self.stdout.write("Stopped.")

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        root = Path(settings.BASE_DIR).resolve().parent
        env = dict(os.environ)
        env.setdefault("DJANGO_SETTINGS_MODULE", settings.SETTINGS_MODULE)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        # A session of its own: Ctrl-C reaches this command only, which stops each
        # child once (a second signal would make the worker exit without its grace).
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _exited(self, children: list[tuple[str, subprocess.Popen[bytes]]]) -> str:
        for name, child in children:
            code = child.poll()
            if code is not None:
                return f"The {name} exited with code {code}; stopping the demo."
        return ""

    def _stop(self, children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
        for _, child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, child in children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"The {name} did not stop within {STOP_TIMEOUT}s; killing it.")
                child.kill()
                child.wait(5)
