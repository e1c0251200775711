"""The demo's workflow: "write" an answer token by token, with a progress stream beside it.

Every token comes from a step, so a worker that dies mid-answer is replaced by one
that replays the recorded steps and writes, then goes on from the next token:
no token is written twice, none is skipped.
"""

from __future__ import annotations

import time
from typing import Any

from durable_streams import close_stream, step, workflow, write_stream

from .generator import compose_cached, delay

ANSWER = "answer"
PROGRESS = "progress"


@step
def read_prompt(prompt: str) -> int:
    """The model "reads" the prompt; returns how many tokens the answer has."""
    time.sleep(0.6)
    return len(compose_cached(prompt))


@step
def next_token(prompt: str, index: int) -> str:
    time.sleep(delay(prompt, index))
    return compose_cached(prompt)[index]


@workflow(name="demo.answer")
def answer(prompt: str) -> dict[str, Any]:
    write_stream(PROGRESS, {"stage": "thinking", "done": 0, "total": None})
    total = read_prompt(prompt)
    for index in range(total):
        write_stream(ANSWER, next_token(prompt, index))
        if index % 4 == 3 or index == total - 1:
            write_stream(PROGRESS, {"stage": "writing", "done": index + 1, "total": total})
    close_stream(ANSWER)
    write_stream(PROGRESS, {"stage": "done", "done": total, "total": total})
    close_stream(PROGRESS)
    return {"tokens": total}
