"""SqliteDb's verbs for ids, duplicates and a person's settling, against a real SQLite file:
what they commit, and how (rule 1: intents and job ids synced, `synchronous=FULL`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import JobSpec, JobState, JobType
from orchestrator.store import SqliteDb

T0 = 1_000.0


def spec(job_id: str, *, parent: str | None = None) -> JobSpec:
    job_type = JobType.IMAGE_GEN if parent else JobType.DREAMBOOTH
    return JobSpec(id=job_id, type=job_type, payload={"prompt": job_id}, checkpoint_from=parent)


SPECS = [spec("a"), spec("b"), spec("a-pics", parent="a")]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteDb]:
    store = SqliteDb(tmp_path / "state.db")
    store.sync_manifest("c", SPECS, [spec_fingerprint(s) for s in SPECS], T0)
    try:
        yield store
    finally:
        store.close()


def statements_of(db: SqliteDb, action: Callable[[], object]) -> list[str]:
    """The SQL the verb sends to SQLite, in order (SQLite's own trace of the connection)."""
    seen: list[str] = []
    db._db.set_trace_callback(seen.append)
    try:
        action()
    finally:
        db._db.set_trace_callback(None)
    return seen


def assert_committed_synced(statements: list[str]) -> None:
    """The transaction's COMMIT runs under synchronous=FULL, which is set back to NORMAL after it."""
    assert "COMMIT" in statements, statements
    commit = statements.index("COMMIT")
    full = [i for i, s in enumerate(statements) if s == "PRAGMA synchronous=FULL"]
    normal = [i for i, s in enumerate(statements) if s == "PRAGMA synchronous=NORMAL"]
    assert full and full[-1] < statements.index("BEGIN IMMEDIATE") < commit, statements
    assert normal and normal[0] > commit, statements


def unknown(db: SqliteDb, job_id: str) -> None:
    db.record_intents([(job_id, "{}", "fp")], T0)
    db.move(job_id, JobState.UNKNOWN, T0 + 1, reason="cannot tell")


def test_recorded_duplicates_and_a_settled_job_are_committed_synced(db: SqliteDb) -> None:
    """Remote ids of jobs we pay for, and a person's decision, survive a power cut like an intent does."""
    db.record_intents([("a", "{}", "fp")], T0)
    db.mark_submitted("a", "remote-a", T0)
    assert_committed_synced(statements_of(db, lambda: db.record_duplicates("a", ["remote-a2"])))
    assert db.job("a").duplicate_ids == ("remote-a2",)
    unknown(db, "b")
    assert_committed_synced(
        statements_of(db, lambda: db.settle("b", JobState.QUEUED, T0 + 2, remote_id="remote-b", reason="by hand"))
    )
    assert db.job("b").state is JobState.QUEUED


def test_duplicates_of_a_job_the_state_does_not_hold_are_not_news(db: SqliteDb) -> None:
    """Nothing is recorded for a job id the state has no row for: no `job.duplicate` to report."""
    assert db.record_duplicates("nobody", ["remote-x"]) is False
    assert db.duplicates() == {}


def test_a_job_given_up_by_hand_is_finished_when_it_was_settled(db: SqliteDb) -> None:
    unknown(db, "b")
    db.settle("b", JobState.FAILED, T0 + 5, remote_id=None, reason="settled by hand: given up")
    row = db.job("b")
    assert (row.state, row.finished_at, row.reason) == (JobState.FAILED, T0 + 5, "settled by hand: given up")


def test_a_dependent_revived_by_settling_its_parent_is_updated_at_the_settling(db: SqliteDb) -> None:
    unknown(db, "a")
    db.move("a-pics", JobState.SKIPPED, T0 + 2)  # its parent can give no checkpoint now
    assert db.settle("a", JobState.PENDING, T0 + 9, remote_id=None, reason="settled by hand: send again") == ("a-pics",)
    pics = db.job("a-pics")
    assert (pics.state, pics.updated_at, pics.finished_at) == (JobState.PENDING, T0 + 9, None)
