"""Leases: which worker works on which job in flight, until when, under which epoch.

A worker (a process of `run` with a postgresql:// state) holds the jobs it works on
through a lease on each: an owner, an expiry on the database's clock, and an epoch raised
on every claim or takeover. Jobs are claimed in transactions with `FOR UPDATE SKIP
LOCKED`, so claimers never wait on one another and never both take one job:

- a pending job, by recording its intent (`record_intents`): the claim, the campaign's
  limits (jobs in flight, the submission rate as one token bucket) and the intent are one
  transaction, serialized on the campaign's row;
- a job at the service or with files to fetch, by `claim_work`, which also renews what
  the worker holds (run by the engine every `run.engine.CLAIM_EVERY_S`) and takes over what a
  worker that stopped renewing held once its lease expired. A `submitting` job taken
  over is never sent again: its grace window restarts at the takeover, then it is looked
  for by tag like any lost answer;
- the reading of the job lists, by `claim_work` too: a lease on the campaign's row. Only
  its holder takes the jobs at the service (one reading of a list serves the campaign);
  the other workers hand theirs over to it.

The campaign's row also counts the new jobs of the runs that overlap (`--max-new-jobs`
holds for them together): a worker that joins a campaign no live worker runs starts the
count again.

Every write that follows a claim is fenced: it locks the job's row and names the epoch;
if the lease moved on, it changes nothing and raises `LeaseLost`. A POST is sent only
after `record_attempt` found the lease with at least the API timeout plus a margin left.
A store opened without a worker (status, plan, settle: a person) holds nothing and is
not fenced.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg.rows import DictRow

from ..errors import LeaseLost
from ..models import AT_SERVICE, IN_FLIGHT, TO_DOWNLOAD, JobState
from .base import JOB_COLUMNS, Claims, JobRow, WorkerRow, job_row
from .pg_base import PgBase, Pool, conflicts_retried

LEASE_S = 60.0  # a worker that stops renewing loses its jobs this long after its last renewal
NOW = "extract(epoch FROM clock_timestamp())::double precision"  # the database's clock: one for every host
WORK = [s.value for s in (*IN_FLIGHT, *TO_DOWNLOAD)]  # states whose jobs a worker holds
CHECKED = [s.value for s in AT_SERVICE]  # states whose jobs the list reader holds


@dataclass(frozen=True, slots=True)
class Worker:
    """This process, as the other workers see it."""

    id: str
    host: str
    pid: int

    @classmethod
    def this_process(cls) -> Worker:
        host, pid = socket.gethostname(), os.getpid()
        return cls(f"{host}:{pid}:{uuid.uuid4().hex[:8]}", host, pid)


class PgLeases(PgBase):
    def __init__(
        self, pool: Pool, url: str, campaign: str, *, worker: Worker | None = None, lease_s: float = LEASE_S
    ) -> None:
        super().__init__(pool, url, campaign)
        self.worker, self.lease_s = worker, lease_s
        self._held: dict[str, int] = {}  # job id -> the epoch of this worker's lease on it
        self._joined = False  # registered in dlb_workers (by the first claim_work)

    @property
    def shared(self) -> bool:
        return self.worker is not None

    def part_suffix(self, job_id: str) -> str:
        """A worker's partial files carry its lease's epoch: a worker whose lease was taken over
        (frozen, then woken) can only ever write and rename its own, never its successor's."""
        return f".{self._held[job_id]}.part" if job_id in self._held else ".part"

    def _lease_args(self, job_id: str | None = None) -> dict[str, object]:
        return {
            "me": self.worker.id if self.worker else None,
            "epoch": self._held.get(job_id, -1) if job_id else -1,
            "lease": self.lease_s,
        }

    async def _hold(self, db: AsyncConnection[DictRow], job_id: str) -> None:
        """Lock the job's row for this transaction; LeaseLost if another worker holds it now."""
        if self.worker is None:
            return
        cur = await db.execute(
            "SELECT lease_owner, lease_epoch FROM dlb_jobs WHERE campaign=%(c)s AND id=%(id)s FOR UPDATE",
            self._args({"id": job_id}),
        )
        row = await cur.fetchone()
        if row is None:
            return  # the verb says there is no such job
        if row["lease_owner"] is None and job_id not in self._held:
            return  # nobody holds it (pending, ended): the verb's own guard on its state decides
        if row["lease_owner"] != self.worker.id or row["lease_epoch"] != self._held.get(job_id):
            self._held.pop(job_id, None)
            raise LeaseLost(job_id)

    async def _fenced(self, job_id: str, sql: str, args: dict[str, object]) -> int:
        """One statement about a job (or its files), only while this worker holds it."""
        async with self._tx() as db:
            await self._hold(db, job_id)
            return (await db.execute(sql, self._args(args))).rowcount

    def _released(self, job_id: str, state: JobState) -> None:
        if state.value not in WORK:
            self._held.pop(job_id, None)

    # -- finding work -------------------------------------------------------------------

    def _mine(self, alias: str = "") -> str:
        return f" AND {alias}lease_owner = %(me)s" if self.worker is not None else ""

    async def held(self, states: Iterable[JobState]) -> list[JobRow]:
        rows = await self._query(
            f"SELECT {JOB_COLUMNS} FROM dlb_jobs WHERE campaign=%(c)s AND state = ANY(%(s)s){self._mine()}"
            " ORDER BY position",
            {"s": [s.value for s in states], **self._lease_args()},
        )
        return [job_row(r) for r in rows]

    async def waiting_elsewhere(self, states: Iterable[JobState]) -> int:
        """Jobs in `states` that this worker does not hold: another worker's now, or nobody's
        (claimable). A worker that runs to the end waits for them (to take them over if their
        worker dies); the jobs it holds itself, and gave up on, it lets go when it ends."""
        if self.worker is None:
            return 0
        rows = await self._query(
            "SELECT COUNT(*) AS n FROM dlb_jobs WHERE campaign=%(c)s AND state = ANY(%(s)s)"
            " AND lease_owner IS DISTINCT FROM %(me)s",
            {"s": [s.value for s in states], **self._lease_args()},
        )
        return int(rows[0]["n"])

    @conflicts_retried
    async def claim_work(
        self, *, window_end: float, downloads: int, checks: int, checking: Collection[str] = ()
    ) -> Claims:
        """Renew this worker's leases, release the jobs that left work, and claim what nobody
        holds (or whose holder stopped renewing): every lost answer, up to `checks` jobs at the
        service and up to `downloads` jobs with files to fetch (earliest ended first: the
        service deletes files 48 hours after the end). Returns what changed.

        The jobs at the service are checked by one worker at a time, the list reader, so that
        one reading of a job list serves the whole campaign: another worker hands the jobs it
        submitted over to it (all but those in `checking`, which it is reading right now)."""
        if self.worker is None:
            return Claims()
        args = {**self._lease_args(), "host": self.worker.host, "pid": self.worker.pid, "end": window_end}
        if not self._joined:
            await self._join(args)
        reads_lists = await self._read_lists(args)
        # What this worker held when the renewal began: jobs it claims meanwhile (an intent
        # recorded while this runs) are not in the renewal's view and must stay held.
        before = dict(self._held)
        async with self._tx() as db:
            await db.execute(f"UPDATE dlb_workers SET heartbeat_at = {NOW} WHERE id=%(me)s", self._args(args))
            await db.execute(
                "WITH done AS (SELECT id FROM dlb_jobs WHERE campaign=%(c)s AND lease_owner=%(me)s"
                " AND (NOT state = ANY(%(work)s) OR (NOT %(reads)s AND state = ANY(%(at)s)"
                " AND NOT id = ANY(%(checking)s))) ORDER BY id FOR UPDATE)"
                " UPDATE dlb_jobs j SET lease_owner = NULL FROM done WHERE j.campaign=%(c)s AND j.id = done.id",
                self._args({**args, "work": WORK, "reads": reads_lists, "at": CHECKED, "checking": sorted(checking)}),
            )
            cur = await db.execute(  # rows locked in id order, as every verb that locks several does
                "WITH mine AS (SELECT id FROM dlb_jobs WHERE campaign=%(c)s AND lease_owner=%(me)s ORDER BY id"
                f" FOR UPDATE) UPDATE dlb_jobs j SET lease_until = {NOW} + %(lease)s FROM mine"
                " WHERE j.campaign=%(c)s AND j.id = mine.id RETURNING j.id, j.lease_epoch, j.state",
                self._args(args),
            )
            renewed = {r["id"]: (int(r["lease_epoch"]), r["state"]) for r in await cur.fetchall()}
            gone = [j for j in before if j not in renewed]  # let go (ended, pending again) or taken
            cur = await db.execute(
                "SELECT id FROM dlb_jobs WHERE campaign=%(c)s AND id = ANY(%(ids)s) AND lease_owner <> %(me)s",
                self._args({**args, "ids": gone}),
            )
            lost = tuple(r["id"] for r in await cur.fetchall())
            cur = await db.execute(
                "SELECT COUNT(*) AS n FROM dlb_workers WHERE campaign=%(c)s AND stopped_at IS NULL"
                f" AND heartbeat_at > {NOW} - %(lease)s",
                self._args(args),
            )
            live_row = await cur.fetchone()
            live = max(1, int(live_row["n"]) if live_row else 1)
            holding = [state for _, state in renewed.values()]
            room_checks = checks - sum(s in CHECKED for s in holding)
            room_downloads = downloads - sum(s in {x.value for x in TO_DOWNLOAD} for s in holding)
            if room_downloads > 0:  # an even share of all the files to fetch: the other workers fetch too
                cur = await db.execute(
                    "SELECT COUNT(*) AS n FROM dlb_jobs WHERE campaign=%(c)s AND state = ANY(%(s)s)",
                    self._args({**args, "s": [s.value for s in TO_DOWNLOAD]}),
                )
                total = await cur.fetchone()
                mine = sum(s in {x.value for x in TO_DOWNLOAD} for s in holding)
                room_downloads = min(room_downloads, -(-int(total["n"] if total else 0) // live) - mine)
            if not reads_lists:
                room_checks = 0  # the list reader's
            gained: list[tuple[str, int, str | None]] = []
            for states, room, order in (
                ([JobState.SUBMITTING.value], None, "position"),
                (CHECKED, room_checks, "next_check_at NULLS FIRST, position"),
                ([s.value for s in TO_DOWNLOAD], room_downloads, "ended_at NULLS LAST, position"),
            ):
                if room is not None and room <= 0:
                    continue
                gained += await self._claim(db, states, room, order, args)
        for job_id in gone:
            if self._held.get(job_id) == before[job_id]:  # not claimed again meanwhile
                del self._held[job_id]
        self._held.update({j: epoch for j, (epoch, _) in renewed.items()})
        self._held.update({j: e for j, e, _ in gained})
        return Claims(
            gained=tuple(j for j, _, _ in gained),
            taken=tuple(j for j, _, before in gained if before is not None),
            lost=lost,
            workers=live,
            reads_lists=reads_lists,
        )

    async def _join(self, args: dict[str, object]) -> None:
        """Register this worker. A worker that joins a campaign no live worker runs starts a new
        round of `--max-new-jobs`: runs that overlap share one allowance."""
        async with self._tx() as db:
            await db.execute("SELECT 1 FROM dlb_campaigns WHERE name=%(c)s FOR UPDATE", self._args())
            await db.execute(
                "UPDATE dlb_campaigns SET new_jobs_in_round = 0 WHERE name=%(c)s AND NOT EXISTS (SELECT 1"
                " FROM dlb_workers WHERE campaign=%(c)s AND stopped_at IS NULL"
                f" AND heartbeat_at > {NOW} - %(lease)s)",
                self._args(args),
            )
            await db.execute(
                f"INSERT INTO dlb_workers VALUES (%(me)s, %(c)s, %(host)s, %(pid)s, {NOW}, {NOW}, NULL)"
                f" ON CONFLICT (id) DO UPDATE SET heartbeat_at = {NOW}",
                self._args(args),
            )
        self._joined = True

    async def _read_lists(self, args: dict[str, object]) -> bool:
        """Take or keep the campaign's list reading (a lease like a job's); False if another
        live worker has it. Its own transaction: the campaign's row is locked before any job's,
        as in `record_intents`."""
        async with self._tx() as db:
            cur = await db.execute(
                f"UPDATE dlb_campaigns SET list_reader=%(me)s, list_reader_until={NOW} + %(lease)s WHERE name=%(c)s"
                f" AND (list_reader IS NULL OR list_reader = %(me)s OR list_reader_until < {NOW}) RETURNING name",
                self._args(args),
            )
            return await cur.fetchone() is not None

    async def new_jobs_in_round(self) -> int:
        rows = await self._query("SELECT new_jobs_in_round AS n FROM dlb_campaigns WHERE name=%(c)s")
        return int(rows[0]["n"]) if rows else 0

    async def _claim(
        self,
        db: AsyncConnection[DictRow],
        states: list[str],
        room: int | None,
        order: str,
        args: dict[str, object],
    ) -> list[tuple[str, int, str | None]]:
        """Claim jobs in `states` that nobody holds or whose lease expired; (id, epoch, previous owner).
        Taken from a worker that stopped renewing: a submitting job's grace window starts again
        now (that worker may have sent it until its lease ran out), and a download's proven
        spans are forgotten (they are that worker's files). A job a worker let go cleanly keeps
        its window."""
        cur = await db.execute(
            "WITH free AS (SELECT id, lease_owner FROM dlb_jobs WHERE campaign=%(c)s AND state = ANY(%(states)s)"
            f" AND (lease_owner IS NULL OR lease_until < {NOW}) ORDER BY {order} LIMIT %(room)s"
            " FOR UPDATE SKIP LOCKED)"
            f" UPDATE dlb_jobs j SET lease_owner=%(me)s, lease_epoch=j.lease_epoch + 1, lease_until={NOW} + %(lease)s,"
            " reconcile_at = CASE WHEN j.state = 'submitting' AND free.lease_owner IS NOT NULL"
            " THEN GREATEST(COALESCE(j.reconcile_at, 0), %(end)s) ELSE j.reconcile_at END"
            " FROM free WHERE j.campaign=%(c)s AND j.id = free.id RETURNING j.id, j.lease_epoch, free.lease_owner",
            self._args({**args, "states": states, "room": room}),
        )
        claimed = [(r["id"], int(r["lease_epoch"]), r["lease_owner"]) for r in await cur.fetchall()]
        taken = [j for j, _, before in claimed if before is not None]
        if taken:
            for table in ("dlb_part_spans", "dlb_part_objects"):
                await db.execute(
                    f"DELETE FROM {table} WHERE campaign=%(c)s AND job_id = ANY(%(ids)s)", self._args({"ids": taken})
                )
        return claimed

    @conflicts_retried
    async def release_all(self) -> None:
        """A worker that stops cleanly hands its jobs back at once (not after its leases expire)."""
        if self.worker is None:
            return
        async with self._tx() as db:  # before the jobs, in a transaction of its own: see _read_lists
            await db.execute(
                "UPDATE dlb_campaigns SET list_reader = NULL WHERE name=%(c)s AND list_reader=%(me)s",
                self._args(self._lease_args()),
            )
        async with self._tx() as db:
            await db.execute(
                "WITH mine AS (SELECT id FROM dlb_jobs WHERE campaign=%(c)s AND lease_owner=%(me)s ORDER BY id"
                " FOR UPDATE) UPDATE dlb_jobs j SET lease_until = NULL, lease_owner = NULL FROM mine"
                " WHERE j.campaign=%(c)s AND j.id = mine.id",
                self._args(self._lease_args()),
            )
            await db.execute(
                f"UPDATE dlb_workers SET stopped_at = {NOW}, heartbeat_at = {NOW} WHERE id=%(me)s",
                self._args(self._lease_args()),
            )
        self._held.clear()

    async def workers(self) -> list[WorkerRow]:
        """The campaign's workers seen in the last day, newest first, with what each holds."""
        rows = await self._query(
            f"SELECT w.id, w.host, w.pid, w.started_at, {NOW} - w.heartbeat_at AS ago,"
            " w.stopped_at IS NOT NULL AS stopped,"
            " COUNT(j.id) FILTER (WHERE j.state = 'submitting') AS submitting,"
            " COUNT(j.id) FILTER (WHERE j.state IN ('queued', 'running')) AS checking,"
            " COUNT(j.id) FILTER (WHERE j.state IN ('succeeded', 'downloading')) AS downloading,"
            f" BOOL_OR(c.list_reader = w.id AND c.list_reader_until > {NOW}) AS reads_lists"
            " FROM dlb_workers w JOIN dlb_campaigns c ON c.name = w.campaign"
            " LEFT JOIN dlb_jobs j ON j.campaign = w.campaign AND j.lease_owner = w.id"
            f" AND j.lease_until > {NOW} WHERE w.campaign=%(c)s AND w.heartbeat_at > {NOW} - 86400"
            " GROUP BY w.id ORDER BY w.started_at DESC"
        )
        return [
            WorkerRow(
                id=r["id"],
                host=r["host"],
                pid=int(r["pid"]),
                started_at=float(r["started_at"]),
                seen_s_ago=float(r["ago"]),
                stopped=bool(r["stopped"]),
                submitting=int(r["submitting"]),
                checking=int(r["checking"]),
                downloading=int(r["downloading"]),
                reads_lists=bool(r["reads_lists"]),
            )
            for r in rows
        ]
