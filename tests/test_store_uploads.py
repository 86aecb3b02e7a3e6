"""The store's record of multipart uploads into a bucket, beyond the contract's verbs: a
version-2 state file upgraded in place, the record and each part synced, no part left in
a table once its upload is forgotten (either backend), and parts the store refuses."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial
from pathlib import Path

import psycopg
import pytest

from orchestrator.store import SqliteDb, UploadedPart
from orchestrator.store.base import HASH_STATE_MAX, MAX_PART_NUMBER
from orchestrator.store.postgres import PostgresStore
from orchestrator.store.schema import MIGRATIONS, SCHEMA_V1, SCHEMA_VERSION

from .test_store_contract import FILE, a_file_to_fetch, part, started


def start(db: SqliteDb, remote_id: str = FILE) -> None:
    db.upload_started(
        "a", remote_id, upload_id="u-1", key="out/a/m.safetensors", part_bytes=8, size=20, source_etag=None
    )


def version_2_state(path: Path) -> None:
    """A state file as version 2 left it: a job downloading, a partial file with a proven span."""
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(SCHEMA_V1)
        for script in MIGRATIONS[2]:
            db.executescript(script)
        db.execute("INSERT INTO meta VALUES ('schema_version', '2'), ('campaign', 'c')")
        db.execute(
            "INSERT INTO jobs (id, type, state, fingerprint, updated_at, position)"
            " VALUES ('a', 'dreambooth', 'downloading', 'f', 0, 0)"
        )
        db.execute(
            "INSERT INTO files (job_id, remote_id, name, kind, size_bytes)"
            " VALUES ('a', 'ckp_1', 'm.safetensors', 'checkpoint', 100)"
        )
        db.execute("INSERT INTO part_objects VALUES ('a', 'ckp_1', 100, '\"e-1\"')")
        db.execute("INSERT INTO part_spans VALUES ('a', 'ckp_1', 0, 40)")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteDb]:
    store = SqliteDb(tmp_path / "c.db")
    try:
        yield store
    finally:
        store.close()


def test_a_version_2_state_file_is_upgraded_in_place_and_keeps_its_partial_files(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    version_2_state(path)
    store = SqliteDb(path)
    try:
        record = store.part_record("a", "ckp_1")
        assert record is not None and (record.etag, record.spans) == ('"e-1"', ((0, 40),))  # kept
        assert store.job("a").state.value == "downloading"
        assert store.upload_record("a", "ckp_1") is None
        start(store, "ckp_1")
        store.upload_part_done("a", "ckp_1", part(1))
        upload = store.upload_record("a", "ckp_1")
        assert upload is not None and upload.upload_id == "u-1" and dict(upload.parts) == {1: part(1)}
    finally:
        store.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert SCHEMA_VERSION >= 3 and {"uploads", "upload_parts", "part_spans"} <= tables
    SqliteDb(path).close()  # opening an upgraded file again changes nothing


def test_an_upload_and_each_of_its_parts_are_synced_commits(db: SqliteDb) -> None:
    """A part the bucket holds but the store forgot would be sent (and paid for) again."""

    def traced(verb: Callable[[], None]) -> list[str]:
        seen: list[str] = []
        db._db.set_trace_callback(seen.append)
        try:
            verb()
        finally:
            db._db.set_trace_callback(None)
        return seen

    for verb in (partial(start, db), partial(db.upload_part_done, "a", FILE, part(1))):
        seen = traced(verb)
        assert seen[0] == "PRAGMA synchronous=FULL" and seen[-1] == "PRAGMA synchronous=NORMAL"
        assert seen[-2] == "COMMIT"  # committed while FULL
    assert db.upload_record("a", FILE) is not None


def sqlite_rows(db: SqliteDb) -> int:
    return sum(len(db._query(f"SELECT 1 FROM {table}")) for table in ("uploads", "upload_parts"))


def test_no_part_outlives_its_upload_in_sqlite(db: SqliteDb) -> None:
    db.upload_part_done("a", FILE, part(1))  # never started
    assert sqlite_rows(db) == 0
    start(db)
    db.upload_part_done("a", FILE, part(1))
    db.upload_part_done("a", FILE, part(2))
    db.upload_forget("a", FILE)
    db.upload_part_done("a", FILE, part(3))  # in flight while it was forgotten
    assert sqlite_rows(db) == 0


@pytest.mark.anyio
async def test_no_part_outlives_its_upload_in_postgresql(pg_url: str) -> None:
    def rows() -> int:
        with psycopg.connect(pg_url) as pg:
            found = pg.execute("SELECT (SELECT COUNT(*) FROM dlb_uploads) + (SELECT COUNT(*) FROM dlb_upload_parts)")
            return int(found.fetchone()[0])  # type: ignore[index]

    async with await PostgresStore.open(pg_url, "c") as store:
        await a_file_to_fetch(store)
        await store.upload_part_done("a", FILE, part(1))  # never started
        assert rows() == 0
        await started(store)
        await store.upload_part_done("a", FILE, part(1))
        await store.upload_part_done("a", FILE, part(2))
        await store.upload_forget("a", FILE)
        await store.upload_part_done("a", FILE, part(3))  # in flight while it was forgotten
        assert rows() == 0


def test_a_part_is_refused_with_a_number_the_bucket_has_not_or_a_digest_state_too_big() -> None:
    UploadedPart(number=MAX_PART_NUMBER, etag='"e"', length=0, hash_state=bytes(HASH_STATE_MAX))
    for number, length, state in ((0, 1, b""), (MAX_PART_NUMBER + 1, 1, b""), (1, -1, b""), (1, 1, bytes(257))):
        with pytest.raises(ValueError):
            UploadedPart(number=number, etag='"e"', length=length, hash_state=state)
