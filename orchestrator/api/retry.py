"""Retrying, the only user of tenacity: every retry of the project is a named policy
here, with bounded attempts and total time, jittered exponential backoff.

API calls:
- `idempotent` (GETs: retry server errors, 429s and lost answers);
- `submission` (POSTs that cost money: retry only what provably created nothing, a 429
  or a connection that never opened; anything else goes to reconciliation);
- `preflight` (the API check before the first paid POST: what `idempotent` retries, a
  few quick times, so an API that is not there is reported within a minute).
A `Retry-After` is honoured up to the policy's `retry_after_cap_s`.

The state store: `store_conflicts` (a shared database's transaction aborted because workers
locked each other out: it wrote nothing, so it goes again, `STORE_CONFLICT_RETRY`).

Downloads (storage, not the API):
- `file_attempts`: one file within a download round (`RunSettings.file_retry`);
- `range_attempts`: one range within a file attempt (`RunSettings.range_retry`).
A renewed URL, a switch to one stream and a start-over cost an attempt but no wait. A
missing file, a full disk and bytes that fail verification are never retried here.
So one range is tried at most `download_rounds` x `file_retry.attempts` x
`range_retry.attempts` times in a run (`range_tries_per_run`): 3 x 5 x 5 = 75 by default;
the download stage's rounds (run/download.py) wait `download_requeue_s` between them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from .. import events
from ..config import STORE_CONFLICT_RETRY, RetryPolicy, RunSettings
from ..errors import (
    DownloadError,
    FileGone,
    KeyTaken,
    NoSpace,
    NotSent,
    ObjectChanged,
    RangesIgnored,
    RateLimited,
    ServerError,
    StoreConflict,
    TransportError,
    UrlExpired,
    VerificationFailed,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

IDEMPOTENT_RETRYABLE = (ServerError, RateLimited, TransportError)
SUBMISSION_RETRYABLE = (RateLimited, NotSent)
# Downloads: what another attempt cannot mend goes up at once; what the attempt already
# mended (a renewed URL, one stream instead of ranges, a fresh start) goes again at once.
FILE_FINAL = (FileGone, KeyTaken, NoSpace, VerificationFailed)
RANGE_FINAL = (*FILE_FINAL, RangesIgnored, ObjectChanged)  # the file attempt decides
NO_WAIT = (UrlExpired, RangesIgnored, ObjectChanged)


def range_tries_per_run(settings: RunSettings) -> int:
    """The most times one range of a file is requested in one run."""
    return settings.download_rounds * settings.file_retry.attempts * settings.range_retry.attempts


def _wait(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    backoff = wait_random_exponential(multiplier=policy.backoff_min_s, max=policy.backoff_max_s)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, policy.retry_after_cap_s)
        if isinstance(exc, NO_WAIT):
            return 0.0
        return backoff(state)

    return wait


def _log_retry(what: str, event: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        events.event(log, event, what=what, attempt=state.attempt_number, wait_s=round(wait, 2), reason=exc)

    return before_sleep


async def _call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    retryable: tuple[type[BaseException], ...],
    final: tuple[type[BaseException], ...] = (),
    event: str = "api.retry",
) -> T:
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_s),
        wait=_wait(policy),
        retry=retry_if_exception_type(retryable) & retry_if_not_exception_type(final),
        sleep=anyio.sleep,
        reraise=True,
        before_sleep=_log_retry(what, event),
    )
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity re-raises the last error")


async def idempotent(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    return await _call(fn, policy, what, IDEMPOTENT_RETRYABLE)


async def store_conflicts(fn: Callable[[], Awaitable[T]], what: str) -> T:
    return await _call(fn, STORE_CONFLICT_RETRY, what, (StoreConflict,), event="store.retry")


async def submission(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    return await _call(fn, policy, what, SUBMISSION_RETRYABLE)


async def preflight(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """`idempotent`'s errors, under the short `RunSettings.preflight_retry` (config.PREFLIGHT_RETRY)."""
    return await _call(fn, policy, what, IDEMPOTENT_RETRYABLE)


async def file_attempts(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """One file's attempts in a download round; when they run out, says how many there were."""
    try:
        return await _call(fn, policy, what, (DownloadError,), FILE_FINAL, "download.retry")
    except FILE_FINAL:
        raise
    except DownloadError as exc:
        raise DownloadError(f"{what}: gave up after {policy.attempts} attempts: {exc}") from exc


async def range_attempts(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """One range's attempts within a file attempt."""
    return await _call(fn, policy, what, (DownloadError,), RANGE_FINAL, "download.range_retry")
