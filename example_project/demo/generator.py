"""A deterministic stand-in for a language model: same prompt, same answer, same pace.

It needs no network and no weights, and its answer can be checked exactly.
"""

from __future__ import annotations

import hashlib
import random
import re

OPENINGS = [
    "Here is a short take on “{topic}”.",
    "Good question: “{topic}”.",
    "Let's think about “{topic}” step by step.",
]

IDEAS = [
    "The key idea is to break the work into small steps that each record their result.",
    "A step that finished is never run again, so a restart picks up exactly where it stopped.",
    "Think of it as a checklist that remembers what is already done.",
    "Start with the simplest version that works, then measure before you optimise.",
    "Write down what success looks like before you begin; it keeps the work honest.",
    "If something fails halfway, nothing is repeated and nothing is lost.",
    "Keep each piece small enough to retry cheaply when the network misbehaves.",
    "The reader sees every word the moment it exists, not when the whole answer is ready.",
    "Slow parts are fine as long as progress stays visible and nobody waits in the dark.",
    "When in doubt, make the state explicit: a value you can see is a value you can trust.",
]

CLOSINGS = [
    "That is the whole trick: durable steps, and a stream the reader can rejoin at any time.",
    "In short: record as you go, and let readers resume from the last thing they saw.",
    "Try reloading this page while the answer is still being written: it picks up where it was.",
]

_TOKENS = re.compile(r"\s*\S+")


def _rng(prompt: str) -> random.Random:
    seed = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(seed[:8], "big"))


def topic(prompt: str) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= 80 else text[:79] + "…"


def compose(prompt: str) -> list[str]:
    """The answer to ``prompt`` as tokens: each is a word with the spacing before it."""
    rng = _rng(prompt)
    first = rng.sample(IDEAS, 3)
    second = rng.sample([idea for idea in IDEAS if idea not in first], 2)
    paragraphs = [
        " ".join([rng.choice(OPENINGS).format(topic=topic(prompt)), *first]),
        " ".join([*second, rng.choice(CLOSINGS)]),
    ]
    return _TOKENS.findall("\n\n".join(paragraphs))


def delay(prompt: str, index: int) -> float:
    """Seconds the model "takes" for token ``index``: 30 to 90 ms, longer after a sentence."""
    digest = hashlib.sha256(f"{index}\x00{prompt}".encode("utf-8", "surrogatepass")).digest()
    seconds = 0.03 + digest[0] / 255 * 0.06
    token = compose_cached(prompt)[index]
    if token.endswith((".", ":", "?")):
        seconds += 0.15
    return seconds


_cache: dict[str, list[str]] = {}


def compose_cached(prompt: str) -> list[str]:
    tokens = _cache.get(prompt)
    if tokens is None:
        if len(_cache) > 256:
            _cache.clear()
        tokens = _cache[prompt] = compose(prompt)
    return tokens
