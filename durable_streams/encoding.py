"""JSON encoding of inputs, outputs and stream values, with errors that name the culprit."""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

MAX_KEY_LENGTH = 255


def dumps(value: Any) -> str:
    """Encode ``value`` as compact JSON text that the database stores unchanged.

    Non-ASCII text is kept as is; a string holding lone surrogates cannot be
    stored as UTF-8, so only then is the text written with ASCII escapes.
    """
    text = json.dumps(
        value,
        cls=DjangoJSONEncoder,
        ensure_ascii=False,
        allow_nan=False,
        separators=(",", ":"),
    )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False, separators=(",", ":"))
    return text


def loads(text: str) -> Any:
    return json.loads(text)


def loads_many(texts: list[str]) -> list[Any]:
    """Decode stored JSON texts, each one value, in one parse of the array they make.

    One C-level parse instead of one call per value: several times faster for the
    small values streams carry. A text that is not exactly one value (a row edited
    by hand) changes the count or fails the parse; then each text is decoded alone.
    """
    if not texts:
        return []
    try:
        values = json.loads("[" + ",".join(texts) + "]")
    except ValueError:
        values = None
    if not isinstance(values, list) or len(values) != len(texts):
        return [json.loads(text) for text in texts]
    return values


def encode(value: Any, what: str) -> str:
    """``dumps`` that turns an unencodable value into a TypeError naming ``what``."""
    try:
        return dumps(value)
    except RecursionError:
        raise ValueError(
            f"{what} is nested too deeply to be encoded as JSON (about "
            f"{sys.getrecursionlimit()} levels of lists and dicts at most)."
        ) from None
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} must be JSON-serializable; a value of type "
            f"{_culprit_type(value)} is not ({exc})."
        ) from None


def _culprit_type(value: Any) -> str:
    """Name the innermost value's type that JSON cannot encode."""
    stack = [value]
    # A container met twice is shared or circular: look inside it once, or a cycle never ends.
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
            for key in item:
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    return type(key).__name__
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            try:
                json.dumps(item, cls=DjangoJSONEncoder, allow_nan=False)
            except (TypeError, ValueError):
                return type(item).__name__
    return type(value).__name__


def encode_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], workflow_name: str) -> str:
    inputs = {"args": list(args), "kwargs": kwargs}
    try:
        return dumps(inputs)
    except (TypeError, ValueError, RecursionError):
        pass
    # Encoded one by one only to name the argument at fault.
    for index, arg in enumerate(args):
        encode(arg, f"Argument {index} of workflow {workflow_name!r}")
    for name, arg in kwargs.items():
        encode(arg, f"Argument {name!r} of workflow {workflow_name!r}")
    # Each argument alone fits; together they nest two levels deeper.
    return encode(inputs, f"The arguments of workflow {workflow_name!r}")


def check_text(what: str, value: str) -> str:
    """Refuse text that a database column cannot hold: PostgreSQL rejects NUL, and
    every database rejects lone surrogates, which have no UTF-8 encoding.
    """
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters: {value[:40]!r}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} must be valid Unicode text without lone surrogates: {value[:40]!r}."
        ) from None
    return value


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"A stream key must be a str, not {type(key).__name__}.")
    if not key:
        raise ValueError("A stream key must not be empty.")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"A stream key must be at most {MAX_KEY_LENGTH} characters; "
            f"{key[:20]!r}... has {len(key)}."
        )
    return check_text("A stream key", key)


def encode_stream_value(key: str, value: Any, max_bytes: int) -> str:
    text = encode(value, f"A value written to stream {key!r}")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise ValueError(
            f"A value written to stream {key!r} is {size} bytes once encoded; the limit is "
            f"{max_bytes} (settings.DURABLE_STREAMS['MAX_VALUE_BYTES'])."
        )
    return text
