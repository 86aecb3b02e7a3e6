"""`SqliteUploads`: the SQL of multipart uploads into a bucket (schema 3), mixed into `SqliteDb`.

A file's upload under way and the parts the bucket acknowledged, so that a run killed
mid-upload resumes it (`UploadRecord`, store/base.py). The record and each part are synced
commits: a part the bucket holds but the store forgot would be uploaded (and paid for) again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from .base import UploadedPart, UploadRecord

_FILE = "job_id=? AND remote_id=?"


class SqliteUploads:
    # SqliteDb's: a transaction (synced where `durable`) and a read, their errors as StoreError
    _tx: Callable[..., AbstractContextManager[sqlite3.Connection]]
    _query: Callable[[str, Sequence[Any]], list[sqlite3.Row]]

    def upload_record(self, job_id: str, remote_id: str) -> UploadRecord | None:
        # Two reads, as part_record: one process owns the file and its verbs run one at a time.
        key = (job_id, remote_id)
        found = self._query(
            f"SELECT upload_id, object_key, part_bytes, size, source_etag FROM uploads WHERE {_FILE}", key
        )
        if not found:
            return None
        upload = found[0]
        rows = self._query(
            f"SELECT number, etag, length, hash_state FROM upload_parts WHERE {_FILE} ORDER BY number", key
        )
        parts = {
            r["number"]: UploadedPart(
                number=r["number"], etag=r["etag"], length=r["length"], hash_state=bytes(r["hash_state"])
            )
            for r in rows
        }
        return UploadRecord(
            upload_id=upload["upload_id"],
            key=upload["object_key"],
            part_bytes=upload["part_bytes"],
            size=upload["size"],
            source_etag=upload["source_etag"],
            parts=parts,
        )

    def upload_started(
        self,
        job_id: str,
        remote_id: str,
        *,
        upload_id: str,
        key: str,
        part_bytes: int,
        size: int,
        source_etag: str | None,
    ) -> None:
        """The file's upload is now this one: any earlier record of the file goes, with its parts
        (they belong to another upload, whose ETags would not complete this one)."""
        with self._tx(durable=True) as db:
            db.execute(f"DELETE FROM upload_parts WHERE {_FILE}", (job_id, remote_id))
            db.execute(
                "INSERT OR REPLACE INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, remote_id, upload_id, key, part_bytes, size, source_etag),
            )

    def upload_part_done(self, job_id: str, remote_id: str, part: UploadedPart) -> None:
        """The bucket acknowledged this part (a part of its number before is replaced: the upload
        keeps the last one sent). Ignored where no upload of the file is recorded (forgotten
        while the part was in flight): no part outlives its upload's record."""
        with self._tx(durable=True) as db:
            db.execute(
                "INSERT INTO upload_parts SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM uploads"
                f" WHERE {_FILE}) ON CONFLICT (job_id, remote_id, number) DO UPDATE SET etag=excluded.etag,"
                " length=excluded.length, hash_state=excluded.hash_state",
                (job_id, remote_id, part.number, part.etag, part.length, part.hash_state, job_id, remote_id),
            )

    def upload_forget(self, job_id: str, remote_id: str) -> None:
        """The upload is over (completed or aborted): its record and parts go."""
        # Not synced: at worst an OS crash brings back the record of an upload that is over,
        # one the bucket no longer knows.
        with self._tx() as db:
            db.execute(f"DELETE FROM upload_parts WHERE {_FILE}", (job_id, remote_id))
            db.execute(f"DELETE FROM uploads WHERE {_FILE}", (job_id, remote_id))
