"""The store's record of partial files: schema 2, and the upgrade of a version-1 state file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from orchestrator.store import SqliteDb
from orchestrator.store.schema import SCHEMA_V1, SCHEMA_VERSION


def version_1_state(path: Path) -> None:
    """A state file as version 1 wrote it: a job downloading, its file's ETag and finished ranges."""
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_V1)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('campaign', 'c')")
        db.execute(
            "INSERT INTO jobs (id, type, state, fingerprint, updated_at, position)"
            " VALUES ('a', 'dreambooth', 'downloading', 'f', 0, 0)"
        )
        db.execute(
            "INSERT INTO files (job_id, remote_id, name, kind, size_bytes, etag)"
            " VALUES ('a', 'ckp_1', 'm.safetensors', 'checkpoint', 100, '\"e-1\"')"
        )
        db.executemany("INSERT INTO file_ranges VALUES ('a', 'ckp_1', ?)", [(0,), (3,)])


def test_a_version_1_state_file_is_upgraded_and_its_range_indexes_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    version_1_state(path)
    store = SqliteDb(path)
    try:
        assert store.part_record("a", "ckp_1") is None  # nothing proven: the file starts over
        assert [f.name for f in store.files("a")] == ["m.safetensors"]  # the rest is kept
        store.part_start_over("a", "ckp_1", 100)
        store.part_prove("a", "ckp_1", 0, 40)
        store.part_prove("a", "ckp_1", 0, 30)  # a shorter span never shrinks a longer one
        store.part_prove("a", "ckp_1", 60, 40)
        store.part_set_etag("a", "ckp_1", '"e-2"')
        record = store.part_record("a", "ckp_1")
        assert record is not None and (record.size, record.etag, record.spans) == (100, '"e-2"', ((0, 40), (60, 40)))
        assert (record.prefix(), record.proven_bytes()) == (40, 80)
        store.part_keep_only("a", "ckp_1", [(0, 20)])
        assert store.part_record("a", "ckp_1") == type(record)(size=100, etag='"e-2"', spans=((0, 20),))
        store.file_done("a", "ckp_1", "0" * 64, 100)
        assert store.part_record("a", "ckp_1") is None  # forgotten once placed
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "file_ranges" not in tables and {"part_objects", "part_spans"} <= tables
    SqliteDb(path).close()  # opening an upgraded file again changes nothing
