"""One request budget for every API call of a run: a token bucket, paused by 429s.
A worker of a shared campaign takes its even share of it (`share`).

When the API answers 429, `pause()` holds *every* caller until the pause ends, not
only the one that was refused: the server limits the key, not the task. A pause is
capped (`RETRY_AFTER_CAP_S`), so a server asking for an hour cannot outlast the
budget's own deadline; a wait that does hit the deadline raises `Throttled`, a
`NotSent`: the request never left, and every caller already handles that.
"""

from __future__ import annotations

import logging
import time

import anyio

from ..config import BUDGET_WAIT_S, RETRY_AFTER_CAP_S
from ..errors import Throttled
from ..events import event

log = logging.getLogger(__name__)


class RequestBudget:
    def __init__(
        self,
        requests_per_s: float,
        *,
        burst: float | None = None,
        pause_cap_s: float = RETRY_AFTER_CAP_S,
        max_wait_s: float = BUDGET_WAIT_S,  # a deadline on every wait
    ) -> None:
        if requests_per_s <= 0:
            raise ValueError("requests_per_s must be positive")
        self.rate = self._whole_rate = requests_per_s
        self.burst = self._whole_burst = burst if burst is not None else max(1.0, requests_per_s)
        self.pause_cap_s = min(pause_cap_s, max_wait_s / 2)  # one pause never uses up the deadline
        self.max_wait_s = max_wait_s
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._paused_until = 0.0
        self._lock = anyio.Lock()
        self.spent = 0

    def share(self, parts: int) -> None:
        """This process is one of `parts` workers of a campaign: it takes an even share, so the
        service sees the whole budget across them, not the budget times the workers."""
        parts = max(1, parts)
        self.rate = self._whole_rate / parts
        self.burst = max(1.0, self._whole_burst / parts)
        self._tokens = min(self._tokens, self.burst)

    def pause(self, seconds: float) -> float:
        """Hold every caller for `seconds`, at most `pause_cap_s`; the pause used."""
        used = min(seconds, self.pause_cap_s)
        if used < seconds:
            event(log, "api.retry_after_capped", asked_s=round(seconds), used_s=round(used, 1))
        self._paused_until = max(self._paused_until, time.monotonic() + used)
        return used

    async def acquire(self) -> None:
        """Wait for one request's worth of budget (FIFO among waiters)."""
        try:
            with anyio.fail_after(self.max_wait_s):
                await self._acquire()
        except TimeoutError as exc:
            raise Throttled(
                f"the request budget did not let the request go within {self.max_wait_s:g} s; it was not sent"
            ) from exc

    async def _acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self._paused_until:
                    await anyio.sleep(self._paused_until - now)
                    continue
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    self.spent += 1
                    return
                await anyio.sleep((1 - self._tokens) / self.rate)
