"""`PostgresStore`: the `Store` over a PostgreSQL database shared by several hosts.

psycopg 3's async pool; every verb one transaction. The SQL is SQLite's (store/sqlite.py),
scoped to one campaign's rows and with row locks where a verb reads before it writes:
`FOR UPDATE` on the job, so two processes never both move one job. A commit is durable
on the server (`synchronous_commit` as the server has it, `on` by default), which is rule
1's "synced" here. Several workers share a campaign through leases (store/pg_lease.py):
the verbs that write are fenced (store/pg_write.py; uploads into a bucket: store/pg_uploads.py).

The URL given by the user may hold a password: it is never shown; `location` is the URL
without it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any

from ..errors import StoreError
from ..models import JobSpec, JobState, JobType, Location
from .base import FILE_COLUMNS, JOB_COLUMNS, FileRow, JobRow, SyncReport, file_row, job_row
from .parts import PartRecord
from .pg_base import conflicts_retried, open_pool
from .pg_lease import LEASE_S, Worker
from .pg_schema import PG_MIGRATIONS, PG_SCHEMA_V1, PG_SCHEMA_VERSION, SCHEMA_LOCK_KEY
from .pg_uploads import PgUploads
from .pg_write import PgWrites


class PostgresStore(PgWrites, PgUploads):
    """One campaign's rows in a shared database. Open with `await PostgresStore.open(url, campaign)`."""

    @classmethod
    async def open(
        cls, url: str, campaign: str, *, worker: Worker | None = None, lease_s: float = LEASE_S
    ) -> PostgresStore:
        """Connect, and create or upgrade the schema (once, whichever host comes first). With a
        `worker`, this process takes part in running the campaign (leases, fencing: pg_lease.py);
        without, it only reads (and a person settles)."""
        pool = await open_pool(url)
        store = cls(pool, url, campaign, worker=worker, lease_s=lease_s)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        try:
            await self.release_all()
        finally:
            await super().close()

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _migrate(self) -> None:
        async with self._tx() as db:
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            await db.execute("CREATE TABLE IF NOT EXISTS dlb_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = await (await db.execute("SELECT value FROM dlb_meta WHERE key='schema_version'")).fetchone()
            if row is None:
                await db.execute(PG_SCHEMA_V1)
                await db.execute("INSERT INTO dlb_meta VALUES ('schema_version', '1')")
                version = 1
            else:
                version = int(row["value"])
            if version > PG_SCHEMA_VERSION:
                raise StoreError(
                    f"{self.location} was written by a newer dreamlook-batch (schema {version}, this one "
                    f"knows {PG_SCHEMA_VERSION}): upgrade dreamlook-batch on this host"
                )
            for target in range(version + 1, PG_SCHEMA_VERSION + 1):
                for script in PG_MIGRATIONS.get(target, ()):
                    await db.execute(script)
                await db.execute("UPDATE dlb_meta SET value=%s WHERE key='schema_version'", (str(target),))

    # -- manifest -------------------------------------------------------------------

    @conflicts_retried
    async def sync_manifest(
        self, campaign: str, specs: Sequence[JobSpec], fingerprints: Sequence[str], now: float
    ) -> SyncReport:
        if campaign != self.campaign:
            raise StoreError(
                f"{self.location} holds campaign {self.campaign!r} here, not {campaign!r}: name the campaign to join"
            )
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO dlb_campaigns (name, created_at) VALUES (%(c)s, %(now)s) ON CONFLICT DO NOTHING",
                self._args({"now": now}),
            )
            # One sync at a time per campaign: two hosts loading edited manifests take turns.
            await db.execute("SELECT 1 FROM dlb_campaigns WHERE name=%(c)s FOR UPDATE", self._args())
            cur = await db.execute(
                "SELECT id, fingerprint, sent_fingerprint, checkpoint_from, position, in_manifest, spec FROM dlb_jobs"
                " WHERE campaign=%(c)s",
                self._args(),
            )
            known = {r["id"]: r for r in await cur.fetchall()}
            added: list[str] = []
            changed: list[str] = []
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            for position, (spec, fingerprint) in enumerate(zip(specs, fingerprints, strict=True)):
                values = {"id": spec.id, "fp": fingerprint, "from": spec.checkpoint_from, "pos": position}
                values["spec"] = spec_json(spec)
                old = known.get(spec.id)
                if old is None:
                    inserts.append({**values, "type": spec.type.value, "now": now})
                    added.append(spec.id)
                    continue
                current = (old["fingerprint"], old["checkpoint_from"], old["position"], old["in_manifest"], old["spec"])
                if current != (fingerprint, spec.checkpoint_from, position, True, values["spec"]):
                    updates.append(values)  # a row is locked only if it changes: a re-sync locks nothing
                if old["sent_fingerprint"] is not None and old["sent_fingerprint"] != fingerprint:
                    changed.append(spec.id)
            async with db.cursor() as c:
                if inserts:
                    await c.executemany(
                        "INSERT INTO dlb_jobs (campaign, id, type, state, fingerprint, checkpoint_from, updated_at,"
                        " position, spec) VALUES (%(c)s, %(id)s, %(type)s, 'pending', %(fp)s, %(from)s, %(now)s,"
                        " %(pos)s, %(spec)s)",
                        [self._args(v) for v in inserts],
                    )
                if updates:
                    updates.sort(key=lambda v: str(v["id"]))  # rows locked in id order: no deadlock
                    await c.executemany(
                        "UPDATE dlb_jobs SET fingerprint=%(fp)s, checkpoint_from=%(from)s, in_manifest=TRUE,"
                        " position=%(pos)s, spec=%(spec)s WHERE campaign=%(c)s AND id=%(id)s",
                        [self._args(v) for v in updates],
                    )
            listed = {s.id for s in specs}
            removed = [job_id for job_id in known if job_id not in listed]
            gone = sorted(j for j in removed if known[j]["in_manifest"])
            if gone:
                await db.execute(
                    "UPDATE dlb_jobs SET in_manifest=FALSE WHERE campaign=%(c)s AND id = ANY(%(ids)s)",
                    self._args({"ids": gone}),
                )
            await self._revive_skipped(db, now)  # an edited checkpoint_from may name a live parent
        return SyncReport(tuple(added), tuple(changed), tuple(removed))

    # -- reading --------------------------------------------------------------------

    async def known(self) -> bool:
        """Has this campaign been loaded into the database?"""
        return bool(await self._query("SELECT 1 FROM dlb_jobs WHERE campaign=%(c)s LIMIT 1"))

    async def specs(self) -> list[JobSpec]:
        """The campaign's jobs as the manifest last synced gave them, in its order: what a host
        that joins with `run --campaign NAME` runs, without the manifest file."""
        rows = await self._query("SELECT id, spec FROM dlb_jobs WHERE campaign=%(c)s AND in_manifest ORDER BY position")
        return [spec_from_json(r["id"], r["spec"]) for r in rows]

    async def job(self, job_id: str) -> JobRow:
        rows = await self._query(
            f"SELECT {JOB_COLUMNS} FROM dlb_jobs WHERE campaign=%(c)s AND id=%(id)s", {"id": job_id}
        )
        if not rows:
            raise StoreError(f"no job {job_id!r} in campaign {self.campaign!r} at {self.location}")
        return job_row(rows[0])

    async def jobs(self, states: Iterable[JobState] | None = None) -> list[JobRow]:
        where = "" if states is None else " AND state = ANY(%(states)s)"
        rows = await self._query(
            f"SELECT {JOB_COLUMNS} FROM dlb_jobs WHERE campaign=%(c)s{where} ORDER BY position",
            {"states": [s.value for s in states or ()]},
        )
        return [job_row(r) for r in rows]

    async def newest_submitted(self, job_type: str, limit: int) -> set[str]:
        rows = await self._query(
            "SELECT id FROM dlb_jobs WHERE campaign=%(c)s AND type=%(t)s AND submitted_at IS NOT NULL"
            " ORDER BY submitted_at DESC LIMIT %(n)s",
            {"t": job_type, "n": limit},
        )
        return {r["id"] for r in rows}

    async def ready_to_submit(self, limit: int) -> list[tuple[JobRow, JobState | None, str | None]]:
        columns = ", ".join(f"j.{c.strip()}" for c in JOB_COLUMNS.split(","))
        rows = await self._query(
            f"SELECT {columns}, p.state AS parent_state, p.checkpoint_id AS parent_checkpoint FROM dlb_jobs j"
            " LEFT JOIN dlb_jobs p ON p.campaign = j.campaign AND p.id = j.checkpoint_from"
            " WHERE j.campaign=%(c)s AND j.state='pending' AND j.in_manifest"
            " AND (j.checkpoint_from IS NULL OR p.state = ANY(%(ended)s)) ORDER BY j.position LIMIT %(n)s",
            {"n": limit},
        )
        out = []
        for r in rows:
            parent_state, parent_checkpoint = r.pop("parent_state"), r.pop("parent_checkpoint")
            out.append((job_row(r), JobState(parent_state) if parent_state else None, parent_checkpoint))
        return out

    async def count(self, states: Iterable[JobState]) -> int:
        rows = await self._query(
            "SELECT COUNT(*) AS n FROM dlb_jobs WHERE campaign=%(c)s AND state = ANY(%(s)s)",
            {"s": [s.value for s in states]},
        )
        return int(rows[0]["n"])

    async def ids(self, states: Iterable[JobState]) -> list[str]:
        rows = await self._query(
            "SELECT id FROM dlb_jobs WHERE campaign=%(c)s AND state = ANY(%(s)s) ORDER BY position",
            {"s": [s.value for s in states]},
        )
        return [r["id"] for r in rows]

    async def jobs_by_id(self, ids: Iterable[str]) -> list[JobRow]:
        wanted = list(ids)
        if not wanted:
            return []
        rows = await self._query(
            f"SELECT {JOB_COLUMNS} FROM dlb_jobs WHERE campaign=%(c)s AND id = ANY(%(ids)s)", {"ids": wanted}
        )
        return [job_row(r) for r in rows]

    async def due_for_check(self, now: float) -> list[JobRow]:
        rows = await self._query(
            f"SELECT {JOB_COLUMNS} FROM dlb_jobs WHERE campaign=%(c)s AND state IN ('queued', 'running')"
            " AND remote_id IS NOT NULL AND (next_check_at IS NULL OR next_check_at <= %(now)s)"
            f"{self._mine()} ORDER BY position",
            {"now": now, **self._lease_args()},
        )
        return [job_row(r) for r in rows]

    async def next_check_due(self, after: float) -> float | None:
        rows = await self._query(
            "SELECT MIN(next_check_at) AS t FROM dlb_jobs WHERE campaign=%(c)s AND state IN ('queued', 'running')"
            f" AND next_check_at > %(after)s{self._mine()}",
            {"after": after, **self._lease_args()},
        )
        return float(rows[0]["t"]) if rows and rows[0]["t"] is not None else None

    async def counts(self) -> dict[JobState, int]:
        rows = await self._query(
            "SELECT state, COUNT(*) AS n FROM dlb_jobs WHERE campaign=%(c)s AND in_manifest GROUP BY state"
        )
        return {JobState(r["state"]): int(r["n"]) for r in rows}

    async def durations(self, job_type: str, limit: int = 50) -> list[float]:
        rows = await self._query(
            "SELECT ended_at - submitted_at AS d FROM dlb_jobs WHERE campaign=%(c)s AND type=%(t)s"
            " AND ended_at IS NOT NULL AND submitted_at IS NOT NULL ORDER BY ended_at DESC LIMIT %(n)s",
            {"t": job_type, "n": limit},
        )
        return [float(r["d"]) for r in rows]

    async def duplicates(self) -> dict[str, tuple[str, ...]]:
        rows = await self._query(
            "SELECT id, duplicate_ids FROM dlb_jobs WHERE campaign=%(c)s AND duplicate_ids IS NOT NULL AND in_manifest"
        )
        return {r["id"]: tuple(json.loads(r["duplicate_ids"])) for r in rows}

    async def job_objects(self, job_ids: Sequence[str]) -> dict[str, str]:
        rows = await self._query(
            "SELECT id, job_json FROM dlb_jobs WHERE campaign=%(c)s AND job_json IS NOT NULL AND id = ANY(%(ids)s)",
            {"ids": list(job_ids)},
        )
        return {r["id"]: r["job_json"] for r in rows}

    async def adoption_candidates(self) -> list[JobRow]:
        rows = await self._query(
            f"SELECT {JOB_COLUMNS} FROM dlb_jobs WHERE campaign=%(c)s AND state='pending' AND NOT adoption_checked"
            " AND in_manifest ORDER BY position"
        )
        return [job_row(r) for r in rows]

    async def files(self, job_id: str) -> list[FileRow]:
        rows = await self._query(
            f"SELECT {FILE_COLUMNS} FROM dlb_files WHERE campaign=%(c)s AND job_id=%(j)s ORDER BY name", {"j": job_id}
        )
        return [file_row(r) for r in rows]

    async def all_files(self) -> list[FileRow]:
        rows = await self._query(f"SELECT {FILE_COLUMNS} FROM dlb_files WHERE campaign=%(c)s ORDER BY job_id, name")
        return [file_row(r) for r in rows]

    async def files_by_job(self) -> dict[str, list[FileRow]]:
        grouped: dict[str, list[FileRow]] = {}
        for f in await self.all_files():
            grouped.setdefault(f.job_id, []).append(f)
        return grouped

    async def files_done_total(self) -> tuple[int, int]:
        rows = await self._query(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size_bytes), 0) AS b FROM dlb_files WHERE campaign=%(c)s AND done"
        )
        return int(rows[0]["n"]), int(rows[0]["b"])

    async def manifest_pages(
        self, page_size: int, *, removed: bool = False
    ) -> AsyncIterator[list[tuple[JobRow, list[FileRow]]]]:
        """The manifest's jobs in order (`removed`: the jobs no longer in it) with their files,
        `page_size` jobs a time: keyset pages on (position, id), an index range each, so no
        transaction stays open between pages."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        after: tuple[int, str] = (-1, "")
        while True:
            rows = await self._query(
                f"SELECT {JOB_COLUMNS}, position FROM dlb_jobs WHERE campaign=%(c)s AND in_manifest = %(m)s"
                " AND (position, id) > (%(pos)s, %(id)s) ORDER BY position, id LIMIT %(n)s",
                {"pos": after[0], "id": after[1], "n": page_size, "m": not removed},
            )
            if not rows:
                return
            after = (rows[-1]["position"], rows[-1]["id"])
            jobs = [job_row({k: v for k, v in r.items() if k != "position"}) for r in rows]
            files: dict[str, list[FileRow]] = {}
            for f in await self._query(
                f"SELECT {FILE_COLUMNS} FROM dlb_files WHERE campaign=%(c)s AND job_id = ANY(%(ids)s)"
                " ORDER BY job_id, name",
                {"ids": [j.id for j in jobs]},
            ):
                files.setdefault(f["job_id"], []).append(file_row(f))
            yield [(j, files.get(j.id, [])) for j in jobs]

    # -- partial downloads -------------------------------------------------------------

    async def part_record(self, job_id: str, remote_id: str) -> PartRecord | None:
        key = {"j": job_id, "r": remote_id}
        where = "WHERE campaign=%(c)s AND job_id=%(j)s AND remote_id=%(r)s"
        async with self._tx() as db:
            cur = await db.execute(f"SELECT size, etag FROM dlb_part_objects {where}", self._args(key))
            obj = await cur.fetchone()
            if obj is None:
                return None
            cur = await db.execute(f"SELECT start, length FROM dlb_part_spans {where} ORDER BY start", self._args(key))
            spans = tuple((int(r["start"]), int(r["length"])) for r in await cur.fetchall())
        return PartRecord(size=obj["size"], etag=obj["etag"], spans=spans)


def spec_from_json(job_id: str, text: str) -> JobSpec:
    data = json.loads(text)
    return JobSpec(
        id=job_id,
        type=JobType(data["type"]),
        payload=data["payload"],
        download=frozenset(data["download"]) if data["download"] is not None else None,
        checkpoint_from=data["checkpoint_from"],
        location=Location(data["file"], data["line"]),
    )


def spec_json(spec: JobSpec) -> str:
    """What a host needs to run the job without the manifest file (`run --campaign NAME`)."""
    return json.dumps(
        {
            "type": spec.type.value,
            "payload": spec.payload,
            "download": sorted(spec.download) if spec.download is not None else None,
            "checkpoint_from": spec.checkpoint_from,
            "file": spec.location.file,
            "line": spec.location.line,
        },
        sort_keys=True,
    )
