"""Retrying, the only user of tenacity: bounded attempts and total time, jittered
exponential backoff, `Retry-After` honoured.

Three policies: `idempotent` (GETs: retry server errors, 429s and lost answers),
`submission` (POSTs that cost money: retry only what provably created nothing,
a 429 or a connection that never opened; anything else goes to reconciliation) and
`preflight` (the API check before the first paid POST: what `idempotent` retries,
a few quick times, so an API that is not there is reported within a minute).
A `Retry-After` is honoured up to the policy's `retry_after_cap_s`.
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
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from ..config import RetryPolicy
from ..errors import NotSent, RateLimited, ServerError, TransportError

log = logging.getLogger(__name__)
T = TypeVar("T")

IDEMPOTENT_RETRYABLE = (ServerError, RateLimited, TransportError)
SUBMISSION_RETRYABLE = (RateLimited, NotSent)


def _wait(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    backoff = wait_random_exponential(multiplier=policy.backoff_min_s, max=policy.backoff_max_s)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, policy.retry_after_cap_s)
        return backoff(state)

    return wait


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info("api.retry what=%s attempt=%d wait_s=%.2f error=%s", what, state.attempt_number, wait, exc)

    return before_sleep


async def _call(
    fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str, retryable: tuple[type[BaseException], ...]
) -> T:
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_s),
        wait=_wait(policy),
        retry=retry_if_exception_type(retryable),
        sleep=anyio.sleep,
        reraise=True,
        before_sleep=_log_retry(what),
    )
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity re-raises the last error")


async def idempotent(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    return await _call(fn, policy, what, IDEMPOTENT_RETRYABLE)


async def submission(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    return await _call(fn, policy, what, SUBMISSION_RETRYABLE)


async def preflight(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """`idempotent`'s errors, under the short `RunSettings.preflight_retry` (config.PREFLIGHT_RETRY)."""
    return await _call(fn, policy, what, IDEMPOTENT_RETRYABLE)
