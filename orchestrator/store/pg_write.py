"""The PostgreSQL store's verbs that write: the same guards as SQLite's (store/sqlite.py),
each one transaction, with the job's row locked (`FOR UPDATE`) where a verb reads it
before it writes, so two processes never both move one job."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import DictRow

from ..errors import LeaseLost, StoreError
from ..models import IN_FLIGHT, JobState, can_move
from .base import FileRow
from .pg_base import DEAD_END, conflicts_retried
from .pg_lease import NOW, WORK, PgLeases

_PART = "campaign=%(c)s AND job_id=%(j)s AND remote_id=%(r)s"


class PgWrites(PgLeases):
    # -- submissions (rule 1) -----------------------------------------------------------

    @conflicts_retried
    async def record_intents(
        self,
        intents: Sequence[tuple[str, str, str]],
        now: float,
        *,
        max_active: int | None = None,
        rate_per_s: float | None = None,
        max_new_jobs: int | None = None,
    ) -> list[str]:
        """(job id, sent payload JSON, sent fingerprint): PENDING -> SUBMITTING, in order, for the
        jobs still pending (for a worker: whose manifest entry is still the one it sends: another
        host may have synced an edit since), within the campaign's limits: fewer than `max_active`
        in flight, `rate_per_s` as one token bucket for every worker, and `max_new_jobs` in this
        round (the runs that overlap). One transaction, serialized on the campaign's row: the
        claim, the limits and the intent. Returns the ids recorded (each now leased to this
        worker): only those may be sent."""
        recorded: list[str] = []
        epochs: dict[str, int] = {}
        async with self._tx() as db:
            cur = await db.execute(
                f"SELECT submit_tokens, tokens_at, new_jobs_in_round, {NOW} AS now FROM dlb_campaigns"
                " WHERE name=%(c)s FOR UPDATE",
                self._args(),
            )
            campaign = await cur.fetchone()
            room = len(intents)
            if max_active is not None:
                cur = await db.execute(
                    "SELECT COUNT(*) AS n FROM dlb_jobs WHERE campaign=%(c)s AND state = ANY(%(s)s)",
                    self._args({"s": [s.value for s in IN_FLIGHT]}),
                )
                row = await cur.fetchone()
                room = min(room, max_active - int(row["n"] if row else 0))
            if max_new_jobs is not None and campaign is not None:
                room = min(room, max_new_jobs - int(campaign["new_jobs_in_round"]))
            tokens = None
            if rate_per_s is not None and campaign is not None:
                burst = max(1.0, rate_per_s)
                have = campaign["submit_tokens"]
                since = campaign["now"] - (campaign["tokens_at"] or campaign["now"])
                tokens = burst if have is None else min(burst, have + since * rate_per_s)
                room = min(room, int(tokens))
            for job_id, payload, fingerprint in intents[: max(0, room)]:
                cur = await db.execute(
                    "UPDATE dlb_jobs SET state='submitting', intent_at=%(now)s, sent_payload=%(p)s,"
                    " sent_fingerprint=%(fp)s, updated_at=%(now)s, attempt_at=NULL, reconcile_at=NULL,"
                    " adoption_checked=TRUE, lease_owner=%(me)s, lease_epoch=lease_epoch + 1,"
                    f" lease_until={NOW} + %(lease)s WHERE campaign=%(c)s AND id=%(id)s AND state='pending'"
                    " AND (%(me)s::text IS NULL OR fingerprint=%(fp)s)"
                    " RETURNING lease_epoch",
                    self._args({"now": now, "p": payload, "fp": fingerprint, "id": job_id, **self._lease_args(job_id)}),
                )
                row = await cur.fetchone()
                if row is not None:
                    recorded.append(job_id)
                    epochs[job_id] = int(row["lease_epoch"])
            if recorded or tokens is not None:
                await db.execute(
                    "UPDATE dlb_campaigns SET submit_tokens=COALESCE(%(t)s, submit_tokens),"
                    " tokens_at=COALESCE(%(at)s, tokens_at), new_jobs_in_round=new_jobs_in_round + %(n)s"
                    " WHERE name=%(c)s",
                    self._args(
                        {
                            "t": None if tokens is None else tokens - len(recorded),
                            "at": campaign["now"] if campaign and tokens is not None else None,
                            "n": len(recorded),
                        }
                    ),
                )
        if self.worker is not None:  # held once committed
            self._held.update(epochs)
        return recorded

    async def mark_submitted(
        self, job_id: str, remote_id: str, now: float, *, next_check_at: float | None = None
    ) -> None:
        await self.mark_submitted_many([(job_id, remote_id, next_check_at)], now)

    @conflicts_retried
    async def mark_submitted_many(self, items: Sequence[tuple[str, str, float | None]], now: float) -> list[str]:
        """(job id, remote id, first look): SUBMITTING -> QUEUED, in one transaction. Returns the
        ids another worker holds now (its lease ran out and was taken over: that worker finds the
        job by its tag after its own grace window); nothing is recorded for them."""
        taken: list[str] = []
        async with self._tx() as db:
            for job_id, remote_id, next_check_at in sorted(items):  # rows locked in id order: no deadlock
                try:
                    await self._hold(db, job_id)
                except LeaseLost:
                    if not await self._answer_after_takeover(db, job_id, remote_id, now, next_check_at):
                        taken.append(job_id)
                    continue
                cur = await db.execute(
                    "UPDATE dlb_jobs SET state='queued', remote_id=%(r)s, submitted_at=%(now)s, updated_at=%(now)s,"
                    " remote_state='queued', next_check_at=%(next)s"
                    " WHERE campaign=%(c)s AND id=%(id)s AND state='submitting'",
                    self._args({"r": remote_id, "now": now, "next": next_check_at, "id": job_id}),
                )
                if cur.rowcount != 1:
                    raise StoreError(f"job {job_id!r} was not being submitted; remote id {remote_id} not recorded")
        return taken

    async def _answer_after_takeover(
        self, db: AsyncConnection[DictRow], job_id: str, remote_id: str, now: float, next_check_at: float | None
    ) -> bool:
        """This worker's POST was answered after another took the job over. The remote job exists:
        if the job is pending again (its listing came before the job did) it is recorded as this
        one (True: nothing will send it again); if the job has another id, this one is recorded
        as its duplicate."""
        cur = await db.execute(
            "UPDATE dlb_jobs SET state='queued', remote_id=%(r)s, submitted_at=%(now)s, updated_at=%(now)s,"
            " remote_state='queued', next_check_at=%(next)s, reason=%(why)s"
            " WHERE campaign=%(c)s AND id=%(id)s AND state='pending' AND lease_owner IS NULL",
            self._args(
                {
                    "r": remote_id,
                    "now": now,
                    "next": next_check_at,
                    "id": job_id,
                    "why": f"answered as {remote_id} after another worker had taken it over",
                }
            ),
        )
        if cur.rowcount == 1:
            return True
        cur = await db.execute(
            "SELECT remote_id FROM dlb_jobs WHERE campaign=%(c)s AND id=%(id)s", self._args({"id": job_id})
        )
        row = await cur.fetchone()
        # A job with no id yet is being looked for (or sent) by its holder: the job list shows it
        # both (its tag), and every list read reports two jobs with one tag.
        if row is not None and row["remote_id"] not in (None, remote_id):
            await self._add_duplicates(db, job_id, [remote_id])
        return False

    @conflicts_retried
    async def record_attempt(self, job_id: str, now: float, window_end: float, *, need_s: float = 0.0) -> bool:
        """A POST of this job goes out now, if this worker holds its lease with at least `need_s`
        left (renewed here): False means send nothing. Its answer, if lost, is looked for after
        `window_end`."""
        fence = ""
        if self.worker is not None:
            fence = f" AND lease_owner=%(me)s AND lease_epoch=%(epoch)s AND lease_until > {NOW} + %(need)s"
        changed = await self._write(
            "UPDATE dlb_jobs SET attempt_at=%(now)s, reconcile_at=GREATEST(COALESCE(reconcile_at, 0), %(end)s),"
            f" lease_until = CASE WHEN lease_owner IS NULL THEN NULL ELSE {NOW} + GREATEST(%(lease)s, 2 * %(need)s) END"
            f" WHERE campaign=%(c)s AND id=%(id)s AND state='submitting'{fence}",
            {"now": now, "end": window_end, "id": job_id, "need": need_s, **self._lease_args(job_id)},
        )
        return changed == 1

    @conflicts_retried
    async def answer_lost(self, job_id: str, window_end: float) -> None:
        # Fenced in the statement: a job another worker took over has its own window already.
        await self._write(
            "UPDATE dlb_jobs SET reconcile_at=GREATEST(COALESCE(reconcile_at, 0), %(end)s)"
            " WHERE campaign=%(c)s AND id=%(id)s AND state='submitting'"
            " AND (lease_owner IS NULL OR %(me)s::text IS NULL OR (lease_owner=%(me)s AND lease_epoch=%(epoch)s))",
            {"end": window_end, "id": job_id, **self._lease_args(job_id)},
        )

    @conflicts_retried
    async def adopt(self, found: Sequence[tuple[str, str, float | None]], checked: Sequence[str], now: float) -> None:
        async with self._tx() as db:
            for job_id, remote_id, next_check_at in found:
                cur = await db.execute(
                    "UPDATE dlb_jobs SET state='queued', remote_id=%(r)s, submitted_at=%(now)s, updated_at=%(now)s,"
                    " remote_state='queued', next_check_at=%(next)s, adoption_checked=TRUE, reason=%(why)s"
                    " WHERE campaign=%(c)s AND id=%(id)s AND state='pending'",
                    self._args(
                        {
                            "r": remote_id,
                            "now": now,
                            "next": next_check_at,
                            "id": job_id,
                            "why": f"adopted: the service already held {remote_id} with this job's tag",
                        }
                    ),
                )
                if cur.rowcount != 1:
                    if self.worker is not None:
                        continue  # another worker adopted it, or took it to submit: its record stands
                    raise StoreError(f"job {job_id!r} is not pending: cannot adopt {remote_id}")
            await db.execute(
                "UPDATE dlb_jobs SET adoption_checked=TRUE WHERE campaign=%(c)s AND id = ANY(%(ids)s)",
                self._args({"ids": list(checked)}),
            )

    @conflicts_retried
    async def record_duplicates(self, job_id: str, remote_ids: Sequence[str]) -> bool:
        async with self._tx() as db:
            return await self._add_duplicates(db, job_id, remote_ids)

    async def _add_duplicates(self, db: AsyncConnection[DictRow], job_id: str, remote_ids: Sequence[str]) -> bool:
        """Other remote jobs with this job's tag; True when any of them is news."""
        cur = await db.execute(
            "SELECT duplicate_ids FROM dlb_jobs WHERE campaign=%(c)s AND id=%(id)s FOR UPDATE",
            self._args({"id": job_id}),
        )
        row = await cur.fetchone()
        if row is None:
            return False
        known: list[str] = json.loads(row["duplicate_ids"]) if row["duplicate_ids"] else []
        new = [r for r in remote_ids if r not in known]
        if new:
            await db.execute(
                "UPDATE dlb_jobs SET duplicate_ids=%(d)s WHERE campaign=%(c)s AND id=%(id)s",
                self._args({"d": json.dumps(known + new), "id": job_id}),
            )
        return bool(new)

    # -- state changes ----------------------------------------------------------------

    @conflicts_retried
    async def move(
        self, job_id: str, state: JobState, now: float, *, reason: str | None = None, job_json: str | None = None
    ) -> None:
        async with self._tx() as db:
            current = await self._locked_state(db, job_id)
            if not can_move(current, state):
                raise StoreError(f"job {job_id!r} cannot move from {current} to {state}")
            if JobState.SKIPPED in (current, state) and current is not state:
                dead_end = await self._parent_is_dead_end(db, job_id)
                if dead_end is not (state is JobState.SKIPPED):
                    raise StoreError(
                        f"job {job_id!r} cannot move from {current} to {state}: its checkpoint_from job "
                        + ("can give no checkpoint" if dead_end else "may still give a checkpoint")
                    )
            finished = now if state.terminal else None
            ended = now if state in (JobState.SUCCEEDED, JobState.FAILED) and current.in_flight else None
            forget = state is JobState.PENDING  # provably never created: forget the intent
            await db.execute(
                "UPDATE dlb_jobs SET state=%(s)s, updated_at=%(now)s, reason=COALESCE(%(why)s, reason),"
                " finished_at=COALESCE(%(fin)s, finished_at), ended_at=COALESCE(%(end)s, ended_at),"
                " job_json=COALESCE(%(job_json)s, job_json),"
                " intent_at=CASE WHEN %(forget)s THEN NULL ELSE intent_at END,"
                " sent_payload=CASE WHEN %(forget)s THEN NULL ELSE sent_payload END,"
                " sent_fingerprint=CASE WHEN %(forget)s THEN NULL ELSE sent_fingerprint END,"
                " lease_owner=CASE WHEN %(s)s = ANY(%(work)s) THEN lease_owner END,"
                " lease_until=CASE WHEN %(s)s = ANY(%(work)s) THEN lease_until END"
                " WHERE campaign=%(c)s AND id=%(id)s",
                self._args(
                    {
                        "s": state.value,
                        "now": now,
                        "why": reason,
                        "job_json": job_json,
                        "fin": finished,
                        "end": ended,
                        "forget": forget,
                        "id": job_id,
                        "work": WORK,
                    }
                ),
            )
        self._released(job_id, state)

    @conflicts_retried
    async def settle(
        self, job_id: str, state: JobState, now: float, *, remote_id: str | None, reason: str
    ) -> tuple[str, ...]:
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE dlb_jobs SET state=%(s)s, remote_id=COALESCE(%(r)s, remote_id), reason=%(why)s,"
                " updated_at=%(now)s, finished_at=%(fin)s,"
                " submitted_at=CASE WHEN %(r)s::text IS NULL THEN submitted_at ELSE %(now)s END"
                " WHERE campaign=%(c)s AND id=%(id)s AND state='unknown'",
                self._args(
                    {
                        "s": state.value,
                        "r": remote_id,
                        "why": reason,
                        "now": now,
                        "fin": now if state.terminal else None,
                        "id": job_id,
                    }
                ),
            )
            if cur.rowcount != 1:
                raise StoreError(f"job {job_id!r} is not unknown: nothing to settle")
            return await self._revive_skipped(db, now)

    @conflicts_retried
    async def check_writable(self) -> None:
        """A committed write, as an intent would be: before the first paid POST, not after it."""
        await self._write(
            "INSERT INTO dlb_campaigns (name, created_at, write_checked_at) VALUES (%(c)s, %(now)s, %(now)s)"
            " ON CONFLICT (name) DO UPDATE SET write_checked_at=excluded.write_checked_at",
            {"now": 0.0},
        )

    @conflicts_retried
    async def update_remote(
        self,
        job_id: str,
        *,
        remote_state: str,
        percentage: float | None,
        next_check_at: float | None,
        now: float,
    ) -> None:
        await self._fenced(
            job_id,
            "UPDATE dlb_jobs SET remote_state=%(rs)s, percentage=%(pct)s, next_check_at=%(next)s, checks=checks+1,"
            " updated_at=%(now)s WHERE campaign=%(c)s AND id=%(id)s",
            {"rs": remote_state, "pct": percentage, "next": next_check_at, "now": now, "id": job_id},
        )

    @conflicts_retried
    async def check_at(self, job_id: str, when: float) -> None:
        await self._fenced(
            job_id,
            "UPDATE dlb_jobs SET next_check_at=%(t)s WHERE campaign=%(c)s AND id=%(id)s",
            {"t": when, "id": job_id},
        )

    @conflicts_retried
    async def record_success(
        self, job_id: str, *, checkpoint_id: str | None, files: Sequence[FileRow], remote_state: str, now: float
    ) -> None:
        async with self._tx() as db:
            current = await self._locked_state(db, job_id)
            if not can_move(current, JobState.SUCCEEDED):
                raise StoreError(f"job {job_id!r} cannot move from {current} to succeeded")
            if files:
                async with db.cursor() as c:
                    await c.executemany(
                        "INSERT INTO dlb_files (campaign, job_id, remote_id, name, kind, size_bytes)"
                        " VALUES (%(c)s, %(j)s, %(r)s, %(n)s, %(k)s, %(size)s) ON CONFLICT DO NOTHING",
                        [
                            self._args(
                                {"j": job_id, "r": f.remote_id, "n": f.name, "k": f.kind.value, "size": f.size_bytes}
                            )
                            for f in files
                        ],
                    )
            await db.execute(
                "UPDATE dlb_jobs SET state='succeeded', checkpoint_id=COALESCE(%(ck)s, checkpoint_id),"
                " remote_state=%(rs)s, percentage=100, next_check_at=NULL, checks=checks+1, updated_at=%(now)s,"
                " ended_at=COALESCE(ended_at, %(now)s), lease_owner=NULL, lease_until=NULL"
                " WHERE campaign=%(c)s AND id=%(id)s",
                self._args({"ck": checkpoint_id, "rs": remote_state, "now": now, "id": job_id}),
            )
            await self._revive_skipped(db, now)
        # Its files go to whichever worker has download room (it claims them, earliest ended first).
        self._held.pop(job_id, None)

    # -- files and partial downloads ------------------------------------------------------

    @conflicts_retried
    async def file_done(self, job_id: str, remote_id: str, sha256: str, size: int) -> None:
        async with self._tx() as db:
            await self._hold(db, job_id)
            key = self._args({"j": job_id, "r": remote_id, "sha": sha256, "size": size})
            await db.execute(f"UPDATE dlb_files SET done=TRUE, sha256=%(sha)s, size_bytes=%(size)s WHERE {_PART}", key)
            await _forget_part(db, key)

    @conflicts_retried
    async def file_lost(self, job_id: str, remote_id: str) -> None:
        await self._fenced(job_id, f"UPDATE dlb_files SET lost=TRUE WHERE {_PART}", {"j": job_id, "r": remote_id})

    @conflicts_retried
    async def file_missing(self, job_id: str, remote_id: str) -> None:
        await self._fenced(
            job_id, f"UPDATE dlb_files SET done=FALSE, sha256=NULL WHERE {_PART}", {"j": job_id, "r": remote_id}
        )

    @conflicts_retried
    async def part_start_over(self, job_id: str, remote_id: str, size: int | None) -> None:
        async with self._tx() as db:
            await self._hold(db, job_id)
            key = self._args({"j": job_id, "r": remote_id, "size": size})
            await _forget_part(db, key)
            await db.execute(
                "INSERT INTO dlb_part_objects (campaign, job_id, remote_id, size)"
                " VALUES (%(c)s, %(j)s, %(r)s, %(size)s)",
                key,
            )

    @conflicts_retried
    async def part_set_etag(self, job_id: str, remote_id: str, etag: str | None) -> None:
        await self._fenced(
            job_id, f"UPDATE dlb_part_objects SET etag=%(e)s WHERE {_PART}", {"j": job_id, "r": remote_id, "e": etag}
        )

    @conflicts_retried
    async def part_prove(self, job_id: str, remote_id: str, start: int, length: int) -> None:
        await self._fenced(
            job_id,
            "INSERT INTO dlb_part_spans VALUES (%(c)s, %(j)s, %(r)s, %(s)s, %(n)s)"
            " ON CONFLICT (campaign, job_id, remote_id, start)"
            " DO UPDATE SET length=GREATEST(dlb_part_spans.length, excluded.length)",
            {"j": job_id, "r": remote_id, "s": start, "n": length},
        )

    @conflicts_retried
    async def part_keep_only(self, job_id: str, remote_id: str, spans: Sequence[tuple[int, int]]) -> None:
        async with self._tx() as db:
            await self._hold(db, job_id)
            key = self._args({"j": job_id, "r": remote_id})
            await db.execute(f"DELETE FROM dlb_part_spans WHERE {_PART}", key)
            if spans:
                async with db.cursor() as c:
                    await c.executemany(
                        "INSERT INTO dlb_part_spans VALUES (%(c)s, %(j)s, %(r)s, %(s)s, %(n)s)",
                        [{**key, "s": s, "n": n} for s, n in spans],
                    )

    async def _locked_state(self, db: AsyncConnection[DictRow], job_id: str) -> JobState:
        """The job's state, its row locked for this transaction, while this worker may write it."""
        cur = await db.execute(
            "SELECT state FROM dlb_jobs WHERE campaign=%(c)s AND id=%(id)s FOR UPDATE", self._args({"id": job_id})
        )
        row = await cur.fetchone()
        if row is None:
            raise StoreError(f"no job {job_id!r}")
        await self._hold(db, job_id)
        return JobState(row["state"])

    # -- dependents ------------------------------------------------------------------------

    async def _parent_is_dead_end(self, db: AsyncConnection[DictRow], job_id: str) -> bool:
        cur = await db.execute(
            f"SELECT {DEAD_END} AS dead FROM dlb_jobs j JOIN dlb_jobs p ON p.campaign = j.campaign"
            " AND p.id = j.checkpoint_from WHERE j.campaign=%(c)s AND j.id=%(id)s",
            self._args({"id": job_id}),
        )
        row = await cur.fetchone()
        return bool(row and row["dead"])

    async def _revive_skipped(self, db: AsyncConnection[DictRow], now: float | None) -> tuple[str, ...]:
        """Skipped jobs whose parent may still give a checkpoint go back to PENDING (store/sqlite.py
        says why), and their own skipped dependents after them."""
        revived: list[str] = []
        while True:
            cur = await db.execute(
                "SELECT c.id FROM dlb_jobs c LEFT JOIN dlb_jobs p ON p.campaign = c.campaign"
                f" AND p.id = c.checkpoint_from WHERE c.campaign=%(c)s AND c.state='skipped'"
                f" AND (p.id IS NULL OR NOT {DEAD_END})",
                self._args(),
            )
            ids = [r["id"] for r in await cur.fetchall()]
            if not ids:
                return tuple(revived)
            await db.execute(
                "UPDATE dlb_jobs SET state='pending', reason=NULL, finished_at=NULL,"
                " updated_at=COALESCE(%(now)s, updated_at) WHERE campaign=%(c)s AND id = ANY(%(ids)s)",
                self._args({"now": now, "ids": ids}),
            )
            revived += ids


async def _forget_part(db: AsyncConnection[DictRow], key: dict[str, Any]) -> None:
    await db.execute(f"DELETE FROM dlb_part_spans WHERE {_PART}", key)
    await db.execute(f"DELETE FROM dlb_part_objects WHERE {_PART}", key)
