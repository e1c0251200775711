"""Real ASGI server processes (daphne, uvicorn) serving the test project, and a raw
WebSocket client to read from them over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.processes import ROOT
from tests.waiting import wait_until

HOST = "127.0.0.1"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketClient:
    """Just enough of RFC 6455 to read a stream: text frames, ping, close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str,
        origin: str | None = None,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
    ) -> WebSocketClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {HOST}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Origin: {origin or f'http://{HOST}:{port}'}",
        ]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)).decode("latin-1")
        if " 101 " not in head.split("\r\n", 1)[0]:
            writer.close()
            raise ConnectionRefusedError(head.split("\r\n", 1)[0])
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        fields = dict(
            line.split(": ", 1) for line in head.strip().split("\r\n")[1:] if ": " in line
        )
        assert {k.lower(): v for k, v in fields.items()}["sec-websocket-accept"] == accept
        return cls(reader, writer)

    async def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def _frame(self) -> tuple[bool, int, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return bool(first & 0x80), first & 0x0F, await self.reader.readexactly(length)

    async def receive(self, timeout: float) -> dict[str, Any] | tuple[int, str]:
        """The next JSON frame, or (code, reason) once the server closes."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no frame within {timeout}s")
            fin, opcode, payload = await asyncio.wait_for(self._frame(), remaining)
            if opcode == 0x9:
                await self._send(0xA, payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                await self._send(0x8, payload[:2])
                self.writer.close()
                return code, payload[2:].decode()
            elif opcode in (0x1, 0x0):
                parts.append(payload)
                if fin:
                    return json.loads(b"".join(parts).decode())

    def close(self) -> None:
        self.writer.close()


class ServerProcess:
    """An ASGI server process serving ``tests.asgi:application``; output in a log file."""

    name = ""
    port: int

    def __init__(self, command: list[str], log: Path, env: dict[str, str], **popen: Any) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *command, "tests.asgi:application"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                **popen,
            )

    def _wait_listening(self, listening: Any) -> Any:
        """Wait until ``listening()`` finds the server's line in its log, and return it."""
        found = wait_until(
            lambda: self.process.poll() is not None or listening(),
            timeout=30,
            interval=0.05,
            what=f"{self.name} to listen",
        )
        assert self.process.poll() is None, f"{self.name} exited:\n{self.log()}"
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Daphne(ServerProcess):
    """``daphne tests.asgi:application`` on a port the OS picks."""

    name = "daphne"

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        super().__init__(["daphne", "-b", HOST, "-p", "0"], log, env)
        found = self._wait_listening(
            lambda: re.search(r"Listening on TCP address 127\.0\.0\.1:(\d+)", self.log())
        )
        self.port = int(found.group(1))


class Uvicorn(ServerProcess):
    """``uvicorn tests.asgi:application`` on a socket bound here (so no port race)."""

    name = "uvicorn"

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        listener = socket.socket()
        listener.bind((HOST, 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        fd = listener.fileno()
        command = ["uvicorn", "--fd", str(fd), "--lifespan", "off"]
        try:
            super().__init__(command, log, env, pass_fds=(fd,))
        finally:
            listener.close()
        self._wait_listening(lambda: "Uvicorn running" in self.log())
