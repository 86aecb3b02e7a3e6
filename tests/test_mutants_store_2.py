"""SqliteDb's adoption verb against a real SQLite file (what it commits, and how: rule 1,
job ids synced), and the name a retried file download is logged under (api/retry.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.api.retry import file_attempts
from orchestrator.config import RetryPolicy
from orchestrator.errors import DownloadError
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import JobState
from orchestrator.store import SqliteDb

from .test_mutants_retry_store import fails_once
from .test_mutants_store import SPECS, T0, assert_committed_synced, statements_of


@pytest.fixture
def state(tmp_path: Path) -> Iterator[SqliteDb]:
    store = SqliteDb(tmp_path / "state.db")
    store.sync_manifest("c", SPECS, [spec_fingerprint(s) for s in SPECS], T0)
    try:
        yield store
    finally:
        store.close()


def test_an_adopted_job_is_queued_under_the_remote_id_and_committed_synced(state: SqliteDb) -> None:
    """An adopted remote id is a job we hold and pay for: it survives a power cut like an intent."""
    statements = statements_of(state, lambda: state.adopt([("a", "remote-a", T0 + 30)], ["a", "b"], T0))
    assert_committed_synced(statements)
    a, b = state.job("a"), state.job("b")
    assert (a.state, a.remote_id, a.submitted_at, a.next_check_at) == (JobState.QUEUED, "remote-a", T0, T0 + 30)
    assert a.adoption_checked and a.reason == "adopted: the service already held remote-a with this job's tag"
    assert (b.state, b.remote_id, b.adoption_checked) == (JobState.PENDING, None, True)
    assert [r.id for r in state.adoption_candidates()] == ["a-pics"]


@pytest.mark.anyio
async def test_a_retried_file_download_is_logged_as_a_download_retry(caplog: pytest.LogCaptureFixture) -> None:
    fetch = fails_once(DownloadError("connection reset"), b"bytes")
    policy = RetryPolicy(attempts=3, total_s=5.0, backoff_min_s=0.001, backoff_max_s=0.001)
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert await file_attempts(fetch, policy, "j0/a.png") == b"bytes"
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 1 and retries[0].startswith("download.retry what=j0/a.png attempt=1 "), retries
