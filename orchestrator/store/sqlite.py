"""`SqliteDb`: the campaign in one SQLite file (WAL, versioned schema); every SQL statement.

Intents and job ids are committed with `synchronous=FULL` (rule 1: synced before and
right after the paid POST), and so is a file's `done`; other updates with `NORMAL`, which
WAL keeps through a crash of the process. Read-then-write transactions take `BEGIN IMMEDIATE`.

Inside a batch (store/sqlite_batch.py: store/threaded.py's group commit) a verb's
transaction is a SAVEPOINT of the batch's one transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..models import IN_FLIGHT, PARENT_ENDED, JobSpec, JobState, can_move
from .base import FILE_COLUMNS, JOB_COLUMNS, FileRow, JobRow, SyncReport, file_row, job_row
from .parts import PartRecord
from .schema import MIGRATIONS, SCHEMA_V1, SCHEMA_VERSION
from .sqlite_batch import CommitTally, SqliteBatches, _Batch
from .sqlite_uploads import SqliteUploads

BUSY_TIMEOUT_MS = 5_000
_ENDED = tuple(s.value for s in PARENT_ENDED)
_ENDED_MARKS = ",".join("?" * len(_ENDED))
_IN_FLIGHT = tuple(s.value for s in IN_FLIGHT)
# The parent `p` can give no checkpoint: its dependents are skipped, and only then.
_DEAD_END = f"(p.state IN ({_ENDED_MARKS}) AND p.checkpoint_id IS NULL)"


class SqliteDb(SqliteUploads, SqliteBatches):  # uploads: store/sqlite_uploads.py; batches: sqlite_batch.py
    def __init__(self, path: Path) -> None:
        self.path = path
        self._batch: _Batch | None = None
        self.tally = CommitTally()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # One worker thread at a time uses the connection (store/threaded.py), not always the same one.
            self._db = sqlite3.connect(
                path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc

    def _migrate(self) -> None:
        with self._tx():
            exists = self._db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
            if not exists:
                self._run_script(SCHEMA_V1)
                self._db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
            version = int(self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer dreamlook-batch (schema {version}, this one "
                    f"knows {SCHEMA_VERSION}): upgrade dreamlook-batch"
                )
            # Upgrades run in the same transaction as the check: two processes never both migrate.
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for script in MIGRATIONS.get(target, ()):
                    self._run_script(script)
                self._db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(target),))

    def _run_script(self, script: str) -> None:
        for statement in filter(str.strip, script.split(";")):
            self._db.execute(statement)

    @contextmanager
    def _tx(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        if self._batch is not None:
            with self._savepoint(self._batch, durable=durable) as db:
                yield db
            return
        db = self._db
        try:
            if durable:
                db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self.tally.count(changes=1, synced=durable)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc

    # -- manifest -------------------------------------------------------------------

    def sync_manifest(
        self, campaign: str, specs: Sequence[JobSpec], fingerprints: Sequence[str], now: float
    ) -> SyncReport:
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='campaign'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('campaign', ?)", (campaign,))
            elif row[0] != campaign:
                raise StoreError(
                    f"{self.path} holds campaign {row[0]!r}, not {campaign!r}: give this campaign its own --state file"
                )
            known = {r["id"]: r for r in db.execute("SELECT id, fingerprint, sent_fingerprint FROM jobs")}
            added: list[str] = []
            changed: list[str] = []
            seen: set[str] = set()
            for position, (spec, fingerprint) in enumerate(zip(specs, fingerprints, strict=True)):
                seen.add(spec.id)
                old = known.get(spec.id)
                if old is None:
                    db.execute(
                        "INSERT INTO jobs (id, type, state, fingerprint, checkpoint_from, updated_at, position)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            spec.id,
                            spec.type.value,
                            JobState.PENDING.value,
                            fingerprint,
                            spec.checkpoint_from,
                            now,
                            position,
                        ),
                    )
                    added.append(spec.id)
                    continue
                if old["fingerprint"] != fingerprint:
                    db.execute(
                        "UPDATE jobs SET fingerprint=?, checkpoint_from=?, in_manifest=1, position=? WHERE id=?",
                        (fingerprint, spec.checkpoint_from, position, spec.id),
                    )
                else:
                    db.execute("UPDATE jobs SET in_manifest=1, position=? WHERE id=?", (position, spec.id))
                if old["sent_fingerprint"] is not None and old["sent_fingerprint"] != fingerprint:
                    changed.append(spec.id)
            removed = [job_id for job_id in known if job_id not in seen]
            db.executemany("UPDATE jobs SET in_manifest=0 WHERE id=?", [(j,) for j in removed])
            _revive_skipped(db, now)  # an edited checkpoint_from may name a parent that can still give one
        return SyncReport(tuple(added), tuple(changed), tuple(removed))

    # -- reading --------------------------------------------------------------------

    def job(self, job_id: str) -> JobRow:
        rows = self._query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise StoreError(f"no job {job_id!r} in {self.path}")
        return job_row(rows[0])

    def jobs(self, states: Iterable[JobState] | None = None) -> list[JobRow]:
        if states is None:
            rows = self._query(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY position")
        else:
            wanted = [s.value for s in states]
            marks = ",".join("?" * len(wanted))
            rows = self._query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY position", wanted)
        return [job_row(r) for r in rows]

    def newest_submitted(self, job_type: str, limit: int) -> set[str]:
        """Our most recently submitted jobs of a type: those a first page of the job list shows."""
        rows = self._query(
            "SELECT id FROM jobs WHERE type=? AND submitted_at IS NOT NULL ORDER BY submitted_at DESC LIMIT ?",
            (job_type, limit),
        )
        return {r[0] for r in rows}

    def ready_to_submit(self, limit: int) -> list[tuple[JobRow, JobState | None, str | None]]:
        """Pending jobs that may go now or must be skipped, in manifest order, with their
        parent's state and checkpoint: no parent, or a parent that has ended."""
        columns = ", ".join(f"j.{c.strip()}" for c in JOB_COLUMNS.split(","))
        rows = self._query(
            f"SELECT {columns}, p.state AS parent_state, p.checkpoint_id AS parent_checkpoint FROM jobs j"
            " LEFT JOIN jobs p ON p.id = j.checkpoint_from"
            f" WHERE j.state=? AND j.in_manifest=1 AND (j.checkpoint_from IS NULL OR p.state IN ({_ENDED_MARKS}))"
            " ORDER BY j.position LIMIT ?",
            (JobState.PENDING.value, *_ENDED, limit),
        )
        out = []
        for r in rows:
            values = dict(r)
            parent_state, parent_checkpoint = values.pop("parent_state"), values.pop("parent_checkpoint")
            row = job_row(values)
            out.append((row, JobState(parent_state) if parent_state else None, parent_checkpoint))
        return out

    def count(self, states: Iterable[JobState]) -> int:
        """How many jobs are in these states (an index lookup, not a scan)."""
        wanted = [s.value for s in states]
        marks = ",".join("?" * len(wanted))
        return int(self._query(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", wanted)[0][0])

    def ids(self, states: Iterable[JobState]) -> list[str]:
        wanted = [s.value for s in states]
        marks = ",".join("?" * len(wanted))
        return [r[0] for r in self._query(f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY position", wanted)]

    def jobs_by_id(self, ids: Iterable[str]) -> list[JobRow]:
        wanted = list(ids)
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        return [job_row(r) for r in self._query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ({marks})", wanted)]

    def due_for_check(self, now: float) -> list[JobRow]:
        """Jobs in flight whose next look is due."""
        rows = self._query(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN (?, ?) AND remote_id IS NOT NULL"
            " AND (next_check_at IS NULL OR next_check_at <= ?) ORDER BY position",
            (JobState.QUEUED.value, JobState.RUNNING.value, now),
        )
        return [job_row(r) for r in rows]

    def next_check_due(self, after: float) -> float | None:
        """The soonest look due after `after` (those due before it are being taken)."""
        rows = self._query(
            "SELECT MIN(next_check_at) FROM jobs WHERE state IN (?, ?) AND next_check_at > ?",
            (JobState.QUEUED.value, JobState.RUNNING.value, after),
        )
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def counts(self) -> dict[JobState, int]:
        rows = self._query("SELECT state, COUNT(*) FROM jobs WHERE in_manifest=1 GROUP BY state")
        return {JobState(r[0]): r[1] for r in rows}

    def durations(self, job_type: str, limit: int = 50) -> list[float]:
        """Seconds from submission to the API's end, for this campaign's finished jobs of a type."""
        rows = self._query(
            "SELECT ended_at - submitted_at FROM jobs WHERE type=? AND ended_at IS NOT NULL"
            " AND submitted_at IS NOT NULL ORDER BY ended_at DESC LIMIT ?",
            (job_type, limit),
        )
        return [r[0] for r in rows]

    # -- writing --------------------------------------------------------------------

    def record_intents(
        self, intents: Sequence[tuple[str, str, str]], now: float, *, max_active: int | None = None
    ) -> list[str]:
        """(job id, sent payload JSON, sent fingerprint): PENDING -> SUBMITTING, synced, in order,
        for the jobs still pending and while fewer than `max_active` are in flight. The ids
        recorded: only those may be sent."""
        recorded: list[str] = []
        with self._tx(durable=True) as db:
            room = None
            if max_active is not None:
                marks = ",".join("?" * len(_IN_FLIGHT))
                active = db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", _IN_FLIGHT).fetchone()[0]
                room = max_active - int(active)
            for job_id, payload, fingerprint in intents:
                if room is not None and len(recorded) >= room:
                    break
                cur = db.execute(
                    "UPDATE jobs SET state=?, intent_at=?, sent_payload=?, sent_fingerprint=?, updated_at=?,"
                    " attempt_at=NULL, reconcile_at=NULL, adoption_checked=1 WHERE id=? AND state=?",
                    (
                        JobState.SUBMITTING.value,
                        now,
                        payload,
                        fingerprint,
                        now,
                        job_id,
                        JobState.PENDING.value,
                    ),
                )
                if cur.rowcount == 1:
                    recorded.append(job_id)
        return recorded

    def mark_submitted(self, job_id: str, remote_id: str, now: float, *, next_check_at: float | None = None) -> None:
        self.mark_submitted_many([(job_id, remote_id, next_check_at)], now)

    def mark_submitted_many(self, items: Sequence[tuple[str, str, float | None]], now: float) -> list[str]:
        """(job id, remote id, first look): SUBMITTING -> QUEUED, in one synced transaction. Returns
        the ids another worker holds (none: one process owns a SQLite campaign)."""
        with self._tx(durable=True) as db:
            for job_id, remote_id, next_check_at in items:
                cur = db.execute(
                    "UPDATE jobs SET state=?, remote_id=?, submitted_at=?, updated_at=?, remote_state='queued',"
                    " next_check_at=? WHERE id=? AND state=?",
                    (JobState.QUEUED.value, remote_id, now, now, next_check_at, job_id, JobState.SUBMITTING.value),
                )
                if cur.rowcount != 1:
                    raise StoreError(f"job {job_id!r} was not being submitted; remote id {remote_id} not recorded")
        return []

    # -- never paying twice: grace windows, adoption by tag, duplicates (schema 2) ---------

    def record_attempt(self, job_id: str, now: float, window_end: float) -> bool:
        """A POST of this job is being sent now; its answer, if lost, is checked after `window_end`.
        False (send nothing) when the job is not being submitted.

        Not synced (that would be an fsync per POST, beside the batched intents): WAL keeps it through
        kill -9; only an OS crash could lose it, and then the window counts from the intent."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET attempt_at=?, reconcile_at=MAX(COALESCE(reconcile_at, 0), ?) WHERE id=? AND state=?",
                (now, window_end, job_id, JobState.SUBMITTING.value),
            )
            return cur.rowcount == 1

    def answer_lost(self, job_id: str, window_end: float) -> None:
        """The client gave up on the answer: the window ends no sooner than `window_end`."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET reconcile_at=MAX(COALESCE(reconcile_at, 0), ?) WHERE id=? AND state=?",
                (window_end, job_id, JobState.SUBMITTING.value),
            )

    def adoption_candidates(self) -> list[JobRow]:
        """Pending jobs whose tag was never looked for in the job list (this state never sent them)."""
        rows = self._query(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state=? AND adoption_checked=0 AND in_manifest=1 ORDER BY position",
            (JobState.PENDING.value,),
        )
        return [job_row(r) for r in rows]

    def adopt(self, found: Sequence[tuple[str, str, float | None]], checked: Sequence[str], now: float) -> None:
        """(job id, remote id, first look) found under our tag: PENDING -> QUEUED; every id in
        `checked` is marked as looked for. One synced transaction."""
        with self._tx(durable=True) as db:
            for job_id, remote_id, next_check_at in found:
                cur = db.execute(
                    "UPDATE jobs SET state=?, remote_id=?, submitted_at=?, updated_at=?, remote_state='queued',"
                    " next_check_at=?, adoption_checked=1, reason=? WHERE id=? AND state=?",
                    (
                        JobState.QUEUED.value,
                        remote_id,
                        now,
                        now,
                        next_check_at,
                        f"adopted: the service already held {remote_id} with this job's tag",
                        job_id,
                        JobState.PENDING.value,
                    ),
                )
                if cur.rowcount != 1:
                    raise StoreError(f"job {job_id!r} is not pending: cannot adopt {remote_id}")
            db.executemany("UPDATE jobs SET adoption_checked=1 WHERE id=?", [(j,) for j in checked])

    def record_duplicates(self, job_id: str, remote_ids: Sequence[str]) -> bool:
        """Other remote jobs carrying this job's tag; True when any of them is news."""
        with self._tx(durable=True) as db:
            row = db.execute("SELECT duplicate_ids FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return False
            known: list[str] = json.loads(row[0]) if row[0] else []
            new = [r for r in remote_ids if r not in known]
            if new:
                db.execute("UPDATE jobs SET duplicate_ids=? WHERE id=?", (json.dumps(known + new), job_id))
            return bool(new)

    def job_objects(self, job_ids: Sequence[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = self._query(f"SELECT id, job_json FROM jobs WHERE job_json IS NOT NULL AND id IN ({marks})", job_ids)
        return {r[0]: r[1] for r in rows}

    def duplicates(self) -> dict[str, tuple[str, ...]]:
        rows = self._query("SELECT id, duplicate_ids FROM jobs WHERE duplicate_ids IS NOT NULL AND in_manifest=1")
        return {r[0]: tuple(json.loads(r[1])) for r in rows}

    # -- state changes ----------------------------------------------------------------

    def move(
        self, job_id: str, state: JobState, now: float, *, reason: str | None = None, job_json: str | None = None
    ) -> None:
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id!r}")
            current = JobState(row[0])
            if not can_move(current, state):
                raise StoreError(f"job {job_id!r} cannot move from {current} to {state}")
            if JobState.SKIPPED in (current, state) and current is not state:
                dead_end = _parent_is_dead_end(db, job_id)
                if dead_end is not (state is JobState.SKIPPED):
                    raise StoreError(
                        f"job {job_id!r} cannot move from {current} to {state}: its checkpoint_from job "
                        + ("can give no checkpoint" if dead_end else "may still give a checkpoint")
                    )
            finished = now if state.terminal else None
            # When we learned that the API ended the job: what waiting is judged by.
            ended = now if state in (JobState.SUCCEEDED, JobState.FAILED) and current.in_flight else None
            db.execute(
                "UPDATE jobs SET state=?, updated_at=?, reason=COALESCE(?, reason),"
                " finished_at=COALESCE(?, finished_at), ended_at=COALESCE(?, ended_at),"
                " job_json=COALESCE(?, job_json) WHERE id=?",
                (state.value, now, reason, finished, ended, job_json, job_id),
            )
            if state is JobState.PENDING:  # provably never created: forget the intent
                db.execute(
                    "UPDATE jobs SET intent_at=NULL, sent_payload=NULL, sent_fingerprint=NULL WHERE id=?",
                    (job_id,),
                )
            # No revival here: no move turns a dead-end parent into a live one (the property
            # test in tests/test_state_machine.py would catch one that did).

    def settle(
        self, job_id: str, state: JobState, now: float, *, remote_id: str | None, reason: str
    ) -> tuple[str, ...]:
        """A person's decision on an UNKNOWN job: it exists (remote_id), or resubmit, or give up.
        Returns the dependents that were skipped because of it and are pending again."""
        with self._tx(durable=True) as db:
            cur = db.execute(
                "UPDATE jobs SET state=?, remote_id=COALESCE(?, remote_id), reason=?, updated_at=?, finished_at=?,"
                " submitted_at=CASE WHEN ? IS NULL THEN submitted_at ELSE ? END WHERE id=? AND state=?",
                (
                    state.value,
                    remote_id,
                    reason,
                    now,
                    now if state.terminal else None,  # queued or pending again: not finished
                    remote_id,
                    now,
                    job_id,
                    JobState.UNKNOWN.value,
                ),
            )
            if cur.rowcount != 1:
                raise StoreError(f"job {job_id!r} is not unknown: nothing to settle")
            return _revive_skipped(db, now)

    def check_writable(self) -> None:
        """A synced write, as an intent would be: before the first paid POST, not after it."""
        with self._tx(durable=True) as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('write_checked', 'yes')")

    def update_remote(
        self,
        job_id: str,
        *,
        remote_state: str,
        percentage: float | None,
        next_check_at: float | None,
        now: float,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET remote_state=?, percentage=?, next_check_at=?, checks=checks+1, updated_at=?"
                " WHERE id=?",
                (remote_state, percentage, next_check_at, now, job_id),
            )

    def check_at(self, job_id: str, when: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET next_check_at=? WHERE id=?", (when, job_id))

    def files(self, job_id: str) -> list[FileRow]:
        rows = self._query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE job_id=? ORDER BY name",
            (job_id,),
        )
        return [file_row(r) for r in rows]

    def all_files(self) -> list[FileRow]:
        rows = self._query(f"SELECT {FILE_COLUMNS} FROM files ORDER BY job_id, name")
        return [file_row(r) for r in rows]

    def files_done_total(self) -> tuple[int, int]:
        """How many files are done, and their bytes (a tally, not the rows)."""
        row = self._query("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM files WHERE done=1")[0]
        return int(row[0]), int(row[1])

    def manifest_pages(
        self, page_size: int, *, removed: bool = False
    ) -> Generator[list[tuple[JobRow, list[FileRow]]], None, None]:
        """The jobs of the manifest in its order (`removed`: the jobs no longer in it, in their
        old order), each with its files (by name), `page_size` jobs at a time. One ordered read:
        SQLite sorts once (spilling to disk past its cache) and only a page is held here. Paging
        by position instead would scan the table for every page, there being no index on it."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        try:
            cursor = self._db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE in_manifest=? ORDER BY position, id", (0 if removed else 1,)
            )
            try:
                while rows := cursor.fetchmany(page_size):
                    jobs = [job_row(r) for r in rows]
                    files: dict[str, list[FileRow]] = {}
                    for f in self._files_of([j.id for j in jobs]):
                        files.setdefault(f.job_id, []).append(f)
                    yield [(j, files.get(j.id, [])) for j in jobs]
            finally:
                cursor.close()
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc

    def _files_of(self, job_ids: Sequence[str]) -> list[FileRow]:
        marks = ",".join("?" * len(job_ids))
        rows = self._db.execute(
            f"SELECT {FILE_COLUMNS} FROM files WHERE job_id IN ({marks}) ORDER BY job_id, name",
            job_ids,
        ).fetchall()
        return [file_row(r) for r in rows]

    def files_by_job(self) -> dict[str, list[FileRow]]:
        grouped: dict[str, list[FileRow]] = {}
        for f in self.all_files():
            grouped.setdefault(f.job_id, []).append(f)
        return grouped

    def file_done(self, job_id: str, remote_id: str, sha256: str, size: int) -> None:
        """Synced: job.json and SHA256SUMS are written from what this records, without a sync of their own."""
        with self._tx(durable=True) as db:
            db.execute(
                "UPDATE files SET done=1, sha256=?, size_bytes=? WHERE job_id=? AND remote_id=?",
                (sha256, size, job_id, remote_id),
            )
            self._forget_part(db, job_id, remote_id)

    # -- partial downloads: the object and the byte spans proven on disk (see store/parts.py)

    def part_record(self, job_id: str, remote_id: str) -> PartRecord | None:
        key = (job_id, remote_id)
        rows = self._query("SELECT size, etag FROM part_objects WHERE job_id=? AND remote_id=?", key)
        if not rows:
            return None
        spans = self._query("SELECT start, length FROM part_spans WHERE job_id=? AND remote_id=? ORDER BY start", key)
        return PartRecord(size=rows[0][0], etag=rows[0][1], spans=tuple((r[0], r[1]) for r in spans))

    def part_start_over(self, job_id: str, remote_id: str, size: int | None) -> None:
        """Nothing of the part is proven any more; it is (to be) fetched from an object of `size`."""
        with self._tx() as db:
            self._forget_part(db, job_id, remote_id)
            db.execute("INSERT INTO part_objects VALUES (?, ?, ?, NULL)", (job_id, remote_id, size))

    def part_set_etag(self, job_id: str, remote_id: str, etag: str | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE part_objects SET etag=? WHERE job_id=? AND remote_id=?", (etag, job_id, remote_id))

    def part_prove(self, job_id: str, remote_id: str, start: int, length: int) -> None:
        """Bytes [start, start + length) are written and synced (a longer span at one start replaces a shorter)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO part_spans VALUES (?, ?, ?, ?) ON CONFLICT (job_id, remote_id, start)"
                " DO UPDATE SET length=MAX(length, excluded.length)",
                (job_id, remote_id, start, length),
            )

    def part_keep_only(self, job_id: str, remote_id: str, spans: Sequence[tuple[int, int]]) -> None:
        """Forget every proven span but these (before the bytes outside them are overwritten)."""
        with self._tx() as db:
            db.execute("DELETE FROM part_spans WHERE job_id=? AND remote_id=?", (job_id, remote_id))
            db.executemany("INSERT INTO part_spans VALUES (?, ?, ?, ?)", [(job_id, remote_id, s, n) for s, n in spans])

    @staticmethod
    def _forget_part(db: sqlite3.Connection, job_id: str, remote_id: str) -> None:
        db.execute("DELETE FROM part_spans WHERE job_id=? AND remote_id=?", (job_id, remote_id))
        db.execute("DELETE FROM part_objects WHERE job_id=? AND remote_id=?", (job_id, remote_id))

    def file_missing(self, job_id: str, remote_id: str) -> None:
        """A file recorded as done is not on disk: fetch it again."""
        with self._tx() as db:
            db.execute("UPDATE files SET done=0, sha256=NULL WHERE job_id=? AND remote_id=?", (job_id, remote_id))

    def record_success(
        self, job_id: str, *, checkpoint_id: str | None, files: Sequence[FileRow], remote_state: str, now: float
    ) -> None:
        """What a success tells, at once: the trained checkpoint, the files to fetch, the state."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            current = JobState(row[0])
            if not can_move(current, JobState.SUCCEEDED):
                raise StoreError(f"job {job_id!r} cannot move from {current} to succeeded")
            db.executemany(
                "INSERT OR IGNORE INTO files (job_id, remote_id, name, kind, size_bytes) VALUES (?, ?, ?, ?, ?)",
                [(job_id, f.remote_id, f.name, f.kind.value, f.size_bytes) for f in files],
            )
            db.execute(
                "UPDATE jobs SET state=?, checkpoint_id=COALESCE(?, checkpoint_id), remote_state=?, percentage=100,"
                " next_check_at=NULL, checks=checks+1, updated_at=?, ended_at=COALESCE(ended_at, ?) WHERE id=?",
                (JobState.SUCCEEDED.value, checkpoint_id, remote_state, now, now, job_id),
            )
            _revive_skipped(db, now)

    def file_lost(self, job_id: str, remote_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE files SET lost=1 WHERE job_id=? AND remote_id=?", (job_id, remote_id))

    def close(self) -> None:
        self._db.close()


def _parent_is_dead_end(db: sqlite3.Connection, job_id: str) -> bool:
    """Has the job a checkpoint_from parent that can give no checkpoint?"""
    row = db.execute(
        f"SELECT {_DEAD_END} FROM jobs j JOIN jobs p ON p.id = j.checkpoint_from WHERE j.id=?",
        (*_ENDED, job_id),
    ).fetchone()
    return bool(row and row[0])


def _revive_skipped(db: sqlite3.Connection, now: float | None) -> tuple[str, ...]:
    """Skipped jobs whose parent may still give a checkpoint (or that have none any more: the
    manifest changed) go back to PENDING, and their own skipped dependents after them:
    `skipped` always means the parent is a dead end."""
    revived: list[str] = []
    while True:
        ids = [
            r[0]
            for r in db.execute(
                "SELECT c.id FROM jobs c LEFT JOIN jobs p ON p.id = c.checkpoint_from"
                f" WHERE c.state=? AND (p.id IS NULL OR NOT {_DEAD_END})",
                (JobState.SKIPPED.value, *_ENDED),
            )
        ]
        if not ids:
            return tuple(revived)
        db.executemany(
            "UPDATE jobs SET state=?, reason=NULL, finished_at=NULL, updated_at=COALESCE(?, updated_at) WHERE id=?",
            [(JobState.PENDING.value, now, job_id) for job_id in ids],
        )
        revived += ids
