"""The resolve stage (rule 2): submissions whose answer was lost, a lost state, duplicates.

A lost answer leaves its job `submitting` with the time of the attempt recorded. The
service may still be creating it, so the job list is read for it only after its grace
window (attempt + API timeout + grace, or later if the run that sent it said so); the
window is measured from what the store holds, so it holds across kill -9, restarts and
`--once` passes. Adoption (run/adopt.py) runs before the first submissions; every job
list read here goes through the `TagWatch`.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskGroup

from ..errors import ApiError, AuthError, TransportError
from ..events import event
from ..models import JobState, JobType
from ..store import JobRow
from ..ui import clock
from . import reconcile
from .adopt import TagWatch, adopt
from .context import RunContext, unless_taken_over

log = logging.getLogger(__name__)


class ResolveStage:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.store, self.api, self.settings, self.now = ctx.store, ctx.api, ctx.settings, ctx.now
        self.campaign = ctx.manifest.campaign
        self.problem, self.notify, self.note = ctx.events.problem, ctx.events.notify, ctx.events.note
        self.tags = TagWatch(ctx.store, ctx.manifest.campaign)
        self.busy: set[str] = set()  # lost answers being looked for now
        self.resent_since: dict[str, float] = {}  # type -> oldest intent of a job sent again after a lost answer
        self.adoption_failed: str | None = None
        self.unread: set[str] = set()  # lost answers whose job list could not be read: the next run looks
        self._adopting = anyio.Lock()  # one reading of the lists for adoption at a time

    # -- lost answers ---------------------------------------------------------------

    async def answer_lost(self, job_id: str, error: Exception) -> None:
        """The client gave up on the answer: look for the job only after the grace window."""
        await self.store.answer_lost(job_id, self.now() + self.settings.grace_s)
        until = clock(self.window_end(await self.store.job(job_id)))
        event(log, "job.submit_unclear", job_id=job_id, state=JobState.SUBMITTING, reason=error, check_after=until)

    def window_end(self, row: JobRow) -> float:
        """When a lost answer may be looked for: the recorded attempt + API timeout + grace
        (or later, as the run that sent it computed it). No attempt recorded: never sent."""
        if row.attempt_at is None:
            return row.reconcile_at or row.intent_at or 0.0
        return max(row.reconcile_at or 0.0, self.settings.reconcile_after(row.attempt_at))

    async def waiting(self) -> list[JobRow]:
        """SUBMITTING jobs with no POST in flight here: their answer was lost (now or by an earlier run)."""
        skip = self.ctx.posting | self.busy | self.unread
        return [r for r in await self.store.held([JobState.SUBMITTING]) if r.id not in skip]

    async def next_due(self) -> float | None:
        return min((self.window_end(r) for r in await self.waiting()), default=None)

    async def _due_by_type(self) -> list[list[JobRow]]:
        now = self.now()
        due = [r for r in await self.waiting() if self.window_end(r) <= now]
        return [[r for r in due if r.type == t] for t in sorted({r.type for r in due})]

    async def start_due(self, tg: TaskGroup) -> int:
        started = 0
        for rows in await self._due_by_type():
            self.busy.update(r.id for r in rows)
            tg.start_soon(self._resolve_task, rows)
            started += len(rows)
        return started

    async def resolve_due(self) -> None:
        """Lost answers whose window has passed, at once; the others wait."""
        for rows in await self._due_by_type():
            await self.resolve(rows)

    async def _resolve_task(self, rows: list[JobRow]) -> None:
        try:
            await self.resolve(rows)
        finally:
            self.busy.difference_update(r.id for r in rows)
            self.notify()

    async def resolve(self, rows: list[JobRow]) -> None:
        """Jobs of one type: found, provably absent (pending again), or unknown."""
        claimed = {r.remote_id for r in await self.store.jobs() if r.remote_id}
        lost = [
            reconcile.Lost(r.id, f"{self.campaign}/{r.id}", r.sent_payload or "{}", r.intent_at or 0.0) for r in rows
        ]
        verdicts = await reconcile.reconcile(
            self.api, self.settings.retry, JobType(rows[0].type), lost, claimed, self.tags.seen
        )
        for row in rows:
            with unless_taken_over(row.id):
                await self._settle(row, verdicts[row.id])

    async def _settle(self, row: JobRow, found: reconcile.Reconciled) -> None:
        """What the job list told of one lost answer, into the store."""
        event(
            log,
            "job.reconciled",
            job_id=row.id,
            state=row.state,
            verdict=found.verdict,
            reason=found.why,
            remote_id=found.remote_id,
        )
        if found.verdict is reconcile.Verdict.FOUND and found.remote_id:
            await self.store.mark_submitted(
                row.id, found.remote_id, self.now(), next_check_at=self.ctx.first_check(row.type)
            )
        elif found.verdict is reconcile.Verdict.UNREAD:
            # Not knowing is not `unknown`: nothing was learned, so the job stays submitting
            # (never sent again) and the next run reads the list once more.
            self.unread.add(row.id)
            self.note(f"{row.id}: {found.why}; it stays submitting and the next run looks again")
        elif found.verdict is reconcile.Verdict.ABSENT:
            await self.store.move(row.id, JobState.PENDING, self.now())
            since = min(self.resent_since.get(row.type, row.intent_at or 0.0), row.intent_at or 0.0)
            self.resent_since[row.type] = since
        else:
            await self.store.move(row.id, JobState.UNKNOWN, self.now(), reason=found.why)
            await self.problem(
                row.id,
                f"unknown whether it was created: {found.why}. Check your dreamlook.ai jobs page, then run "
                f"`dreamlook-batch settle MANIFEST {row.id} --remote-id ID` (it exists) or `--resubmit`",
            )

    # -- a lost state, duplicates ------------------------------------------------------

    async def adopt(self) -> Exception | None:
        """Before the first submissions: adopt the jobs the service already holds under our tags.
        Returns what kept the job list from being read, if anything (nothing new is sent then)."""
        try:
            async with self._adopting:
                warnings = await adopt(
                    self.api,
                    self.settings,
                    self.store,
                    self.campaign,
                    now=self.now,
                    first_check=lambda job_type: self.now(),  # adopted jobs: look at once
                    watch=self.tags,
                )
        except AuthError:
            raise
        except (ApiError, TransportError) as exc:
            self.adoption_failed = str(exc)
            self.note(
                f"could not read the job list to look for jobs of this campaign the service already holds "
                f"({exc}); nothing new was submitted, to avoid paying twice. Run again when the API answers"
            )
            return exc
        for warning in warnings:
            self.note(warning)
        return None

    async def scan_for_duplicates(self) -> None:
        """Jobs sent again after a lost answer: read the list once more for a late second copy."""
        for job_type, since in self.resent_since.items():
            try:
                listing = await reconcile.read_list(
                    self.api, self.settings.retry, JobType(job_type), reconcile.reaches_back(since), what="scan"
                )
            except (ApiError, TransportError) as exc:
                event(log, "campaign.duplicate_scan_failed", job_type=job_type, reason=exc)
                continue
            await self.tags.seen(listing.items)

    async def report(self) -> None:
        """What the end-of-run summary must say: jobs left in their window, and duplicates."""
        for row in await self.store.held([JobState.SUBMITTING]):  # not another worker's POSTs in flight
            if row.id in self.unread:
                continue  # already said why
            until = clock(self.window_end(row))
            event(log, "job.reconcile_waiting", job_id=row.id, state=row.state, until=until)
            self.note(
                f"{row.id}: its answer was lost; it stays submitting until {until}, when the next run looks "
                "for it in the job list (the service may still be creating it)"
            )
        for job_id, others in (await self.store.duplicates()).items():
            row = await self.store.job(job_id)
            self.note(
                f"{job_id}: DUPLICATE: the service holds {len(others) + 1} jobs with its tag; {row.remote_id} is "
                f"followed and downloaded, the other(s) {', '.join(others)} can be fetched with "
                f"`dreamlook-batch jobs get {row.type} ID`"
            )
