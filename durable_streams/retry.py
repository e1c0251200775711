"""One policy for riding out a failing database read: try again, a little later each time.

A reader, a result waiter and a live feed all read again after a failure, with delays
that double from ``FIRST_DELAY`` up to ``MAX_DELAY``, for up to ``READER_RETRY_SECONDS``
from the first failure; they log once when the trouble starts and once when it ends,
then give up with an error of their choosing. A successful read starts the count again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .conf import get_config


class ReadRetry:
    """The retry schedule of one reader; the caller says how to log and how to give up.

    ``warn(exc, limit)`` runs at the first failure of an outage, ``recovered()`` at the
    first success after one, and ``give_up(exc, limit)`` returns the error raised once
    ``limit`` (``READER_RETRY_SECONDS``) seconds have passed since that first failure.
    """

    FIRST_DELAY, MAX_DELAY = 0.1, 2.0

    def __init__(
        self,
        *,
        warn: Callable[[Exception, float], None],
        recovered: Callable[[], None],
        give_up: Callable[[Exception, float], BaseException],
    ) -> None:
        self._warn = warn
        self._recovered = recovered
        self._give_up = give_up
        self._since: float | None = None
        self._delay = self.FIRST_DELAY

    def failed(self, exc: Exception) -> float:
        """Return the seconds to wait before the next read, or raise once time is up."""
        now = time.monotonic()
        limit = get_config().READER_RETRY_SECONDS
        if self._since is None:
            self._since, self._delay = now, self.FIRST_DELAY
            self._warn(exc, limit)
        left = self._since + limit - now
        if left <= 0:
            error = self._give_up(exc, limit)
            if error is exc:
                raise exc
            raise error from exc
        delay = min(self._delay, left)
        self._delay = min(self._delay * 2, self.MAX_DELAY)
        return delay

    def succeeded(self) -> None:
        if self._since is not None:
            self._recovered()
        self._since = None
