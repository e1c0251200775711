"""The wire protocol shared by the WebSocket and Server-Sent Events endpoints.

Close codes, the reasons given, the parsing of stream addresses and offsets, and the
JSON frames, each the same over both transports.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from .. import encoding

if TYPE_CHECKING:
    pass

# Shared by the WebSocket and Server-Sent Events endpoints

BAD_REQUEST = 4400
FORBIDDEN = 4403
NOT_FOUND = 4404
SERVER_ERROR = 1011
# A WebSocket client left its window full, unacknowledged, for READER_STALL_SECONDS.
TOO_SLOW = 4408

# Offsets live in a PositiveIntegerField: at most 2**31 - 1 on every database.
MAX_OFFSET = 2**31 - 1
_DIGITS = re.compile(r"[0-9]{1,10}")


class BadParameters(ValueError):
    """A stream address or offset that the endpoints refuse; the message says why."""


def parse_offset(raw: str | None, what: str = "offset") -> int:
    if raw is None:
        return 0
    if not _DIGITS.fullmatch(raw) or int(raw) > MAX_OFFSET:
        raise BadParameters(f"{what} must be a whole number from 0 to {MAX_OFFSET}, not {raw!r}.")
    return int(raw)


def parse_address(workflow_id: Any, key: Any) -> tuple[str, str]:
    if not isinstance(workflow_id, str) or not workflow_id or len(workflow_id) > 255:
        raise BadParameters("The workflow id must be 1 to 255 characters.")
    try:
        # A NUL reaching PostgreSQL would fail the query (DataError), not find nothing.
        encoding.check_text("The workflow id", workflow_id)
        encoding.check_key(key)
    except (TypeError, ValueError) as exc:
        raise BadParameters(str(exc)) from None
    return workflow_id, key


def entry_frame(key: str, offset: int, text: str) -> str:
    # ``text`` is stored JSON: it goes into the frame as is, never decoded.
    return f'{{"type":"entry","key":{json.dumps(key)},"offset":{offset},"value":{text}}}'


def frame_bytes(text: str) -> int:
    """The UTF-8 size of a frame; ASCII frames (the usual case) are not encoded to count."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# The reasons the endpoints give, the same over both.
NOT_FOUND_REASON = "No such workflow, or you may not read it."
REVOKED_REASON = "You may no longer read this stream."


def refused_frame(key: str) -> str:
    return json.dumps(
        {"type": "refused", "key": key, "reason": REVOKED_REASON}, separators=(",", ":")
    )


def closed_frame(key: str, length: int) -> str:
    return json.dumps({"type": "closed", "key": key, "length": length}, separators=(",", ":"))


def interrupted_frame(key: str, length: int, status: str) -> str:
    return json.dumps(
        {"type": "interrupted", "key": key, "length": length, "status": status},
        separators=(",", ":"),
    )


def heartbeat_frame(interval: float) -> str:
    """Sent after ``interval`` seconds without any frame: the connection is alive."""
    return json.dumps({"type": "heartbeat", "interval": interval}, separators=(",", ":"))
