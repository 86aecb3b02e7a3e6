"""When to look at a job next, and the one primitive every wait of the engine goes through.

A running job with progress is checked shortly before its predicted end (from
`percentage_done` and `running_duration`), then shortly after it; a job with no
progress yet is predicted from what similar jobs of this campaign took (`remaining_s`:
the live view shows the same prediction); without any estimate, a jittered
exponential backoff. Always within [min_s, max_s]. Training and
image jobs have their own policies (config.py).
"""

from __future__ import annotations

import random
import statistics

import anyio

from ..config import PollPolicy
from ..models import RemoteJob, RemoteState

BEFORE_END_SHARE = 0.9  # the first look: a little before the predicted end
MAX_WAIT_S = 3_600.0  # no wait of the engine lasts longer than this
COALESCE_S = 0.005  # after a wake-up, let other finishing tasks pile up: one pass serves them all


def next_check_in(
    policy: PollPolicy,
    remote: RemoteJob | None,
    checks: int,
    *,
    age_s: float = 0.0,
    typical_s: float | None = None,
) -> float:
    """Seconds until the next GET of a job that has not ended.

    `age_s`: how long since it was submitted; `typical_s`: how long similar jobs of this
    campaign took from submission to end (None while none has ended).
    """
    wait: float | None = None
    remaining = remaining_s(remote, age_s=age_s, typical_s=typical_s) if policy.use_estimates else None
    if remaining is not None:
        # Far from the end: look just before it. Near it: just after it.
        wait = remaining * BEFORE_END_SHARE if remaining > 4 * policy.min_s else remaining + policy.min_s / 2
    if wait is None:
        start = policy.queued_s if remote is None or remote.state is not RemoteState.RUNNING else policy.min_s
        wait = start * policy.backoff ** min(checks, 30)
    wait *= 1 + random.uniform(-policy.jitter, policy.jitter)
    return min(policy.max_s, max(policy.min_s, wait))


def remaining_s(remote: RemoteJob | None, *, age_s: float, typical_s: float | None) -> float | None:
    """Seconds until a job that has not ended is predicted to end, or None without an estimate:
    a running job from its own pace (`percentage_done` over `running_duration`), else from
    what similar jobs of this campaign took (`typical_s`, from submission to end)."""
    speed = pace(remote) if remote is not None else None
    if remote is not None and remote.percentage_done is not None and speed:
        return (100 - remote.percentage_done) / speed
    if typical_s is not None and age_s < typical_s:
        return typical_s - age_s
    return None


def pace(remote: RemoteJob) -> float | None:
    """Percentage points a running job gains per second, at its pace so far (None: unknown)."""
    pct, ran = remote.percentage_done, remote.running_duration_s
    if remote.state is RemoteState.RUNNING and pct and ran and 0 < pct < 100:
        return pct / ran
    return None


def typical(durations: list[float]) -> float | None:
    """What similar jobs took: the median, once three have ended."""
    return statistics.median(durations) if len(durations) >= 3 else None


class Wakeup:
    """Wait for whichever comes first: a notification, a due time, or the deadline."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        with anyio.move_on_after(min(max(0.0, seconds), MAX_WAIT_S)):
            await self._event.wait()
            await anyio.sleep(COALESCE_S)
        self._event = anyio.Event()
