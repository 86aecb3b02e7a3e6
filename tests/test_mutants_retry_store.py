"""The waits and log lines of api/retry.py's policies, and SqliteDb's intent, submission,
move and revival verbs against a real SQLite file (what they commit, and how)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from orchestrator.api.retry import idempotent, range_attempts, store_conflicts
from orchestrator.config import RetryPolicy
from orchestrator.errors import RateLimited, ServerError, StoreConflict, StoreError, UrlExpired
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import JobSpec, JobState, JobType
from orchestrator.store import SqliteDb

from .test_mutants_store import SPECS, T0, assert_committed_synced, db, statements_of  # noqa: F401 (db is a fixture)

T = TypeVar("T")

# -- retry ------------------------------------------------------------------------------


def fails_once(error: Exception, answer: T) -> Callable[[], Awaitable[T]]:
    """A call that raises `error` the first time and answers `answer` after."""
    tries: list[int] = []

    async def call() -> T:
        tries.append(1)
        if len(tries) == 1:
            raise error
        return answer

    return call


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retry what=" in r.getMessage()]


@pytest.mark.anyio
async def test_a_rate_limited_api_read_is_logged_as_api_retry_and_waits_what_the_service_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tries: list[int] = []

    async def read() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise RateLimited(429, "slow down", "list jobs", retry_after_s=0.05)
        return "page"

    policy = RetryPolicy(attempts=3, total_s=5.0, backoff_min_s=0.001, backoff_max_s=0.001, retry_after_cap_s=30.0)
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert await idempotent(read, policy, "list jobs") == "page"
    lines = retry_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith('api.retry what="list jobs" attempt=1 wait_s=0.05 '), lines
    assert 'reason="list jobs: HTTP 429: slow down"' in lines[0]  # the log says why it was tried again
    assert len(tries) == 2


@pytest.mark.anyio
async def test_a_store_conflict_is_tried_again_and_logged_as_a_store_retry(caplog: pytest.LogCaptureFixture) -> None:
    """A shared database's transaction aborted for a deadlock goes again (under its own log event);
    any other store error does not."""
    calls: list[int] = []

    async def conflicting_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise StoreConflict("state store: deadlock detected")
        return "written"

    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert await store_conflicts(conflicting_once, "move") == "written"
    lines = retry_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("store.retry what=move attempt=1 "), lines
    assert 'reason="state store: deadlock detected"' in lines[0]

    async def broken() -> str:
        calls.append(1)
        raise StoreError("state store: disk full")

    with pytest.raises(StoreError, match="disk full"):
        await store_conflicts(broken, "move")
    assert len(calls) == 3


async def waits_of_a_read_that_fails(times: int, policy: RetryPolicy, caplog: pytest.LogCaptureFixture) -> list[float]:
    """An API read that fails `times` times (503) and then answers: the waits its retries logged."""
    tries: list[int] = []

    async def read() -> str:
        tries.append(1)
        if len(tries) <= times:
            raise ServerError(503, "busy", "list jobs")
        return "page"

    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert await idempotent(read, policy, "list jobs") == "page"
    return [float(line.split("wait_s=")[1].split()[0]) for line in retry_lines(caplog)]


@pytest.mark.anyio
async def test_the_first_retries_of_an_api_read_wait_about_the_policy_minimum_not_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = RetryPolicy(attempts=3, total_s=30.0, backoff_min_s=0.001, backoff_max_s=60.0)
    waits = await waits_of_a_read_that_fails(2, policy, caplog)
    assert [f"{w:.2f}" for w in waits] == ["0.00", "0.00"], retry_lines(caplog)


@pytest.mark.anyio
async def test_no_retry_waits_longer_than_the_policy_maximum(caplog: pytest.LogCaptureFixture) -> None:
    """A maximum below the minimum's growth: every wait is cut to the maximum (10 ms here),
    never the seconds the exponential would reach."""
    policy = RetryPolicy(attempts=4, total_s=60.0, backoff_min_s=1.0, backoff_max_s=0.01)
    waits = await waits_of_a_read_that_fails(3, policy, caplog)
    assert len(waits) == 3 and max(waits) <= 0.01, retry_lines(caplog)


@pytest.mark.anyio
async def test_a_range_whose_url_was_renewed_is_asked_again_at_once(caplog: pytest.LogCaptureFixture) -> None:
    fetch_range = fails_once(UrlExpired("signed URL expired; renewed"), b"bytes")
    policy = RetryPolicy(attempts=3, total_s=60.0, backoff_min_s=5.0, backoff_max_s=5.0)
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert await range_attempts(fetch_range, policy, "j0/a.png 0-99") == b"bytes"
    lines = retry_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith('download.range_retry what="j0/a.png 0-99" attempt=1 wait_s=0.0 ')


# -- store ------------------------------------------------------------------------------


def test_intents_and_remote_ids_of_submitted_jobs_are_committed_synced(db: SqliteDb) -> None:
    """Rule 1: an intent, and the remote id we pay for, survive a power cut (COMMIT under synchronous=FULL)."""
    assert_committed_synced(statements_of(db, lambda: db.record_intents([("a", '{"p": 1}', "fp-a")], T0)))
    assert db.job("a").state is JobState.SUBMITTING
    assert_committed_synced(statements_of(db, lambda: db.mark_submitted_many([("a", "remote-a", T0 + 30)], T0 + 1)))
    a = db.job("a")
    assert (a.state, a.remote_id) == (JobState.QUEUED, "remote-a")


def test_a_job_the_api_ended_is_recorded_as_ended_then_and_no_other_move_says_so(db: SqliteDb) -> None:
    db.record_intents([("a", "{}", "fp-a"), ("b", "{}", "fp-b")], T0)
    db.mark_submitted_many([("a", "remote-a", None)], T0 + 1)
    db.move("a", JobState.FAILED, T0 + 5, reason="the API says failure")
    assert db.job("a").ended_at == T0 + 5
    db.move("b", JobState.UNKNOWN, T0 + 6, reason="cannot tell")  # submitting: in flight, but not ended by the API
    assert db.job("b").ended_at is None
    db.move("a-pics", JobState.SKIPPED, T0 + 7)  # never sent
    assert db.job("a-pics").ended_at is None


def test_a_job_sent_back_to_pending_forgets_its_intent_and_an_unknown_one_keeps_it(db: SqliteDb) -> None:
    db.record_intents([("a", '{"p": "a"}', "fp-a"), ("b", '{"p": "b"}', "fp-b")], T0)
    db.move("a", JobState.PENDING, T0 + 1, reason="provably never created")
    a = db.job("a")
    assert (a.state, a.intent_at, a.sent_payload, a.sent_fingerprint) == (JobState.PENDING, None, None, None)
    db.move("b", JobState.UNKNOWN, T0 + 2, reason="cannot tell")
    b = db.job("b")
    assert (b.state, b.intent_at, b.sent_payload, b.sent_fingerprint) == (JobState.UNKNOWN, T0, '{"p": "b"}', "fp-b")


def test_settling_a_parent_names_every_dependent_down_the_chain_that_is_pending_again(tmp_path: Path) -> None:
    specs = [
        JobSpec(id="base", type=JobType.DREAMBOOTH, payload={"p": 1}),
        JobSpec(id="tuned", type=JobType.DREAMBOOTH, payload={"p": 2}, checkpoint_from="base"),
        JobSpec(id="pics", type=JobType.IMAGE_GEN, payload={"p": 3}, checkpoint_from="tuned"),
    ]
    store = SqliteDb(tmp_path / "state.db")
    try:
        store.sync_manifest("c", specs, [spec_fingerprint(s) for s in specs], T0)
        store.record_intents([("base", "{}", "fp")], T0)
        store.move("base", JobState.UNKNOWN, T0 + 1, reason="cannot tell")
        store.move("tuned", JobState.SKIPPED, T0 + 2)
        store.move("pics", JobState.SKIPPED, T0 + 2)
        revived = store.settle("base", JobState.PENDING, T0 + 9, remote_id=None, reason="settled by hand: send again")
        assert revived == ("tuned", "pics")
        assert [store.job(i).state for i in ("tuned", "pics")] == [JobState.PENDING, JobState.PENDING]
    finally:
        store.close()
