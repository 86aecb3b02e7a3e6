"""One request budget for every API call of a run: a token bucket, paused by 429s.

When the API answers 429, `pause()` holds *every* caller until the pause ends, not
only the one that was refused: the server limits the key, not the task.
"""

from __future__ import annotations

import time

import anyio

MAX_WAIT_S = 600.0  # a deadline on every wait: no budget wait outlasts this


class RequestBudget:
    def __init__(self, requests_per_s: float, *, burst: float | None = None) -> None:
        if requests_per_s <= 0:
            raise ValueError("requests_per_s must be positive")
        self.rate = requests_per_s
        self.burst = burst if burst is not None else max(1.0, requests_per_s)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._paused_until = 0.0
        self._lock = anyio.Lock()
        self.spent = 0

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        """Wait for one request's worth of budget (FIFO among waiters)."""
        with anyio.fail_after(MAX_WAIT_S):
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
