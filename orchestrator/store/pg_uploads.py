"""`PgUploads`: multipart uploads into a bucket in the shared database (schema 4), mixed into
`PostgresStore`.

A file's upload under way and the parts the bucket acknowledged (`UploadRecord`,
store/base.py), so that a run killed mid-upload, on this host or another, resumes it. The
writes are fenced like the partial downloads' (`_hold`, store/pg_lease.py): a worker whose
lease on the job moved on changes nothing and gets `LeaseLost`. Unlike those, the records
outlive a takeover (`_claim` leaves them): the upload lives in the shared bucket, and the
new holder resumes it rather than paying for its parts again.
"""

from __future__ import annotations

from .base import UploadedPart, UploadRecord
from .pg_base import conflicts_retried
from .pg_lease import PgLeases

_FILE = "campaign=%(c)s AND job_id=%(j)s AND remote_id=%(r)s"


class PgUploads(PgLeases):
    async def upload_record(self, job_id: str, remote_id: str) -> UploadRecord | None:
        key = self._args({"j": job_id, "r": remote_id})
        async with self._tx() as db:  # one snapshot: the record and the parts it has
            cur = await db.execute(
                f"SELECT upload_id, object_key, part_bytes, size, source_etag FROM dlb_uploads WHERE {_FILE}", key
            )
            upload = await cur.fetchone()
            if upload is None:
                return None
            cur = await db.execute(
                f"SELECT number, etag, length, hash_state FROM dlb_upload_parts WHERE {_FILE} ORDER BY number", key
            )
            rows = await cur.fetchall()
        parts = {
            int(r["number"]): UploadedPart(
                number=int(r["number"]), etag=r["etag"], length=int(r["length"]), hash_state=bytes(r["hash_state"])
            )
            for r in rows
        }
        return UploadRecord(
            upload_id=upload["upload_id"],
            key=upload["object_key"],
            part_bytes=int(upload["part_bytes"]),
            size=int(upload["size"]),
            source_etag=upload["source_etag"],
            parts=parts,
        )

    @conflicts_retried
    async def upload_started(
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
        async with self._tx() as db:
            await self._hold(db, job_id)
            args = self._args(
                {"j": job_id, "r": remote_id, "u": upload_id, "k": key, "pb": part_bytes, "n": size, "e": source_etag}
            )
            await db.execute(f"DELETE FROM dlb_upload_parts WHERE {_FILE}", args)
            await db.execute(
                "INSERT INTO dlb_uploads VALUES (%(c)s, %(j)s, %(r)s, %(u)s, %(k)s, %(pb)s, %(n)s, %(e)s)"
                " ON CONFLICT (campaign, job_id, remote_id) DO UPDATE SET upload_id=excluded.upload_id,"
                " object_key=excluded.object_key, part_bytes=excluded.part_bytes, size=excluded.size,"
                " source_etag=excluded.source_etag",
                args,
            )

    @conflicts_retried
    async def upload_part_done(self, job_id: str, remote_id: str, part: UploadedPart) -> None:
        """The bucket acknowledged this part (a part of its number before is replaced: the upload
        keeps the last one sent). Ignored where no upload of the file is recorded (forgotten
        while the part was in flight): no part outlives its upload's record."""
        async with self._tx() as db:
            await self._hold(db, job_id)
            await db.execute(
                "INSERT INTO dlb_upload_parts SELECT %(c)s, %(j)s, %(r)s, %(num)s, %(e)s, %(len)s, %(h)s"
                f" WHERE EXISTS (SELECT 1 FROM dlb_uploads WHERE {_FILE})"
                " ON CONFLICT (campaign, job_id, remote_id, number) DO UPDATE SET etag=excluded.etag,"
                " length=excluded.length, hash_state=excluded.hash_state",
                self._args(
                    {
                        "j": job_id,
                        "r": remote_id,
                        "num": part.number,
                        "e": part.etag,
                        "len": part.length,
                        "h": part.hash_state,
                    }
                ),
            )

    @conflicts_retried
    async def upload_forget(self, job_id: str, remote_id: str) -> None:
        """The upload is over (completed or aborted): its record and parts go."""
        async with self._tx() as db:
            await self._hold(db, job_id)
            args = self._args({"j": job_id, "r": remote_id})
            await db.execute(f"DELETE FROM dlb_upload_parts WHERE {_FILE}", args)
            await db.execute(f"DELETE FROM dlb_uploads WHERE {_FILE}", args)
