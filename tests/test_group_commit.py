"""Group commit in the SQLite store (store/threaded.py): verbs that arrive together share one
transaction and one commit, each caller learns its own outcome, and no caller is told of a
change that is not in the file. Read back through a second connection, as another process
(`status`) or the next run would."""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import StoreError
from orchestrator.models import JobSpec, JobType
from orchestrator.store import SqliteStore

pytestmark = pytest.mark.anyio
T0 = 1_000.0
JOBS = 200


def spec(job_id: str) -> JobSpec:
    return JobSpec(id=job_id, type=JobType.IMAGE_GEN, payload={"prompt": job_id})


async def campaign(path: Path, jobs: int = JOBS) -> SqliteStore:
    """A store whose jobs are all queued at the service (`r<id>`)."""
    store = await SqliteStore.open(path)
    specs = [spec(f"j{i:03d}") for i in range(jobs)]
    await store.sync_manifest("c", specs, [s.id for s in specs], T0)
    ids = [s.id for s in specs]
    await store.record_intents([(j, "{}", j) for j in ids], T0)
    await store.mark_submitted_many([(j, f"r{j}", None) for j in ids], T0)
    return store


def on_disk(path: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """What another connection (another process) reads from the file."""
    with sqlite3.connect(path) as db:
        return db.execute(sql, args).fetchall()


async def test_changes_made_together_share_commits_and_all_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await campaign(path)
    commits_before, synced_before, changes_before = store.tally
    async with anyio.create_task_group() as tg:
        for i in range(JOBS):
            mark = partial(store.update_remote, remote_state="processing", percentage=50.0, next_check_at=T0 + 5)
            tg.start_soon(partial(mark, f"j{i:03d}", now=T0 + 1))
    commits, synced, changes = store.tally
    assert changes - changes_before == JOBS  # every change counted once
    assert commits - commits_before < JOBS  # and some shared a commit
    assert synced == synced_before  # progress marks are not synced
    assert on_disk(path, "SELECT COUNT(*) FROM jobs WHERE remote_state='processing' AND checks=1") == [(JOBS,)]
    await store.close()


async def test_a_synced_change_is_committed_synced_whatever_it_shares_the_commit_with(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await campaign(path, jobs=0)
    specs = [spec(f"n{i:03d}") for i in range(JOBS)]
    await store.sync_manifest("c", specs, [s.id for s in specs], T0)
    _, synced_before, _ = store.tally
    recorded: list[list[str]] = []

    async def intent(job_id: str) -> None:
        recorded.append(await store.record_intents([(job_id, "{}", job_id)], T0 + 1))

    async with anyio.create_task_group() as tg:
        for i in range(JOBS):
            tg.start_soon(intent, f"n{i:03d}")
            tg.start_soon(store.check_at, f"n{i:03d}", T0 + 2)  # not synced on its own
    assert sorted(r[0] for r in recorded) == [s.id for s in specs]  # each caller told of its own intent
    assert store.tally[1] > synced_before
    assert on_disk(path, "SELECT COUNT(*) FROM jobs WHERE state='submitting' AND next_check_at=?", (T0 + 2,)) == [
        (JOBS,)
    ]
    await store.close()


async def test_a_verb_that_fails_in_a_batch_undoes_only_its_own_change(tmp_path: Path) -> None:
    """mark_submitted_many records its first id, then fails on the second (not being submitted):
    its caller gets the error and neither id is in the file; the others' changes are."""
    path = tmp_path / "s.db"
    store = await campaign(path, jobs=0)
    specs = [spec(f"n{i:03d}") for i in range(JOBS)]
    await store.sync_manifest("c", specs, [s.id for s in specs], T0)
    await store.record_intents([(s.id, "{}", s.id) for s in specs[:-1]], T0)  # the last stays pending
    failed: list[Exception] = []

    async def bad() -> None:
        try:
            await store.mark_submitted_many([("n000", "r-bad", None), (specs[-1].id, "r-last", None)], T0 + 1)
        except StoreError as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        for s in specs[1:-1]:
            tg.start_soon(store.mark_submitted, s.id, f"r{s.id}", T0 + 1)
        tg.start_soon(bad)
        for s in specs[1:-1]:
            tg.start_soon(store.check_at, s.id, T0 + 3)
    assert len(failed) == 1 and "was not being submitted" in str(failed[0])
    assert on_disk(path, "SELECT state, remote_id FROM jobs WHERE id='n000'") == [("submitting", None)]
    assert on_disk(path, "SELECT COUNT(*) FROM jobs WHERE remote_id='r-bad' OR remote_id='r-last'") == [(0,)]
    assert on_disk(path, "SELECT COUNT(*) FROM jobs WHERE state='queued' AND next_check_at=?", (T0 + 3,)) == [
        (JOBS - 2,)
    ]
    await store.close()


async def test_a_batch_whose_transaction_is_lost_runs_again_verb_by_verb(tmp_path: Path) -> None:
    """SQLite rolls a whole transaction back on some errors (an I/O error, a full disk): every
    change of the batch made before it is gone. Their callers must not be told they were
    made: each verb runs again in its own transaction, and each change is made exactly once."""
    path = tmp_path / "s.db"
    store = await campaign(path)
    connection = store._db._db  # the store's own connection: what an I/O error rolls back

    def lost_transaction() -> None:
        if connection.in_transaction:
            connection.execute("ROLLBACK")  # as SQLite does itself on SQLITE_IOERR or SQLITE_FULL

    async with anyio.create_task_group() as tg:
        for i in range(JOBS):
            job_id = f"j{i:03d}"
            tg.start_soon(
                partial(
                    store.update_remote,
                    job_id,
                    remote_state="processing",
                    percentage=None,
                    next_check_at=None,
                    now=T0 + 1,
                )
            )
            if i % 50 == 25:
                tg.start_soon(store._call, lost_transaction)
    # every caller was told its change was made: each is in the file, once (checks counts them)
    assert on_disk(path, "SELECT checks, COUNT(*) FROM jobs GROUP BY checks") == [(1, JOBS)]
    await store.close()


async def test_a_caller_cancelled_while_its_change_is_committed_still_has_it_made(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await campaign(path, jobs=3)
    with anyio.CancelScope() as scope:
        scope.cancel()  # cancelled before it awaits: the verb is handed over, then finished
        await store.file_missing("j000", "nothing")
        await store.check_at("j001", T0 + 9)
    assert on_disk(path, "SELECT next_check_at FROM jobs WHERE id='j001'") == [(T0 + 9,)]
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.job("j000")


async def test_a_synced_verb_handed_over_as_unsynced_is_refused_in_a_batch(tmp_path: Path) -> None:
    """Whether a batch is synced is chosen before it begins: a verb that needs a sync in a batch
    that has none must fail (its caller learns), never be committed unsynced."""
    path = tmp_path / "s.db"
    store = await campaign(path, jobs=50)
    outcomes: list[BaseException | None] = []

    async def unsynced_intent() -> None:
        try:
            await store._call(partial(store._db.check_writable))  # durable=True forgotten
            outcomes.append(None)
        except RuntimeError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(store.check_at, f"j{i:03d}", T0 + 4)
            tg.start_soon(unsynced_intent)
    # alone it is its own synced transaction; in a batch it is refused
    assert any(isinstance(o, RuntimeError) for o in outcomes)
    assert on_disk(path, "SELECT COUNT(*) FROM jobs WHERE next_check_at=?", (T0 + 4,)) == [(50,)]
    await store.close()
