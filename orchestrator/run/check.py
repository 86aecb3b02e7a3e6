"""The check stage: learning how the jobs in flight are doing, with as few requests as will do.

The job list shows the newest jobs first, 50 a page. When a due job is among our 50
most recent of its type and enough others of them are in flight, one page of
`GET /jobs/{type}` updates all it shows, due or not; due jobs it does not show, and
successes whose list entry carries no results, are read by GET of the job. What is
learned sets the next look (run/schedule.py), and `progress` (in memory): each job's
`percentage_done` and predicted end, for the live view. A callback only brings a job's
next look forward: a GET confirms.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ..api import retry
from ..api.client import LIST_PAGE
from ..api.jobs import parse_job, select
from ..errors import ApiError, AuthError, LeaseLost, NotFound, QuotaError, TransportError
from ..events import event
from ..models import AT_SERVICE, JobState, JobType, RemoteJob, RemoteState
from ..store import FileRow, JobRow
from .adopt import TagWatch
from .context import RunContext, unless_taken_over
from .outcome import JobProgress
from .schedule import next_check_in, pace, remaining_s, typical

log = logging.getLogger(__name__)
BATCH_MIN_JOBS = 3  # due jobs of one type that make a list request worth it
CHECKS_AT_ONCE = 8
TYPICAL_REFRESH_S = 1.0


class CheckStage:
    def __init__(self, ctx: RunContext, tags: TagWatch) -> None:
        self.ctx = ctx
        self.tags = tags  # every job list read is checked for duplicates
        self.store, self.api, self.settings, self.now = ctx.store, ctx.api, ctx.settings, ctx.now
        self.specs = ctx.manifest.by_id
        self.problem, self.notify = ctx.events.problem, ctx.events.notify
        self.limiter = anyio.CapacityLimiter(CHECKS_AT_ONCE)
        self.busy: set[str] = set()
        self.callbacks_accepted = 0
        self._hints_seen: set[tuple[str, str]] = set()
        self.hinted: set[str] = set()  # jobs a callback named while they were being checked
        self._typical: dict[str, tuple[float, float | None]] = {}
        self.progress: dict[str, JobProgress] = {}  # jobs at the service, as last seen
        # A shared campaign's job lists are read by one worker at a time (store/pg_lease.py); another
        # worker hands the jobs it submitted over to it, and meanwhile reads each by GET.
        self.reads_lists = True

    # -- scheduling -----------------------------------------------------------------

    async def _typical_s(self, job_type: str) -> float | None:
        stamp, value = self._typical.get(job_type, (0.0, None))
        if time.monotonic() - stamp > TYPICAL_REFRESH_S:
            value = typical(await self.store.durations(job_type))
            self._typical[job_type] = (time.monotonic(), value)
        return value

    async def next_due(self) -> float | None:
        return await self.store.next_check_due(self.now())

    async def start_due(self, tg: TaskGroup, *, everything: bool = False) -> int:
        """Start checks of the jobs that are due (all in flight, with `everything`).

        With many jobs of a type in flight, one reading of the job list updates all it
        covers, due or not; only due jobs it misses get a GET of their own.
        """
        due_by_type: dict[str, list[JobRow]] = {}
        rows = await self.store.held(AT_SERVICE) if everything else await self.store.due_for_check(self.now())
        for row in rows:
            if row.id not in self.busy and row.remote_id is not None:
                due_by_type.setdefault(row.type, []).append(row)
        started = 0
        for job_type, due in due_by_type.items():
            on_first_page = (
                await self.store.newest_submitted(job_type, LIST_PAGE)
                if self.settings.batch_status and self.reads_lists
                else set()
            )
            if any(r.id in on_first_page for r in due):
                in_flight = [
                    r
                    for r in await self.store.jobs_by_id(on_first_page - self.busy)
                    if r.state in AT_SERVICE and r.remote_id is not None
                ]
                if self.store.shared:  # only the jobs this worker holds: the others are other workers' to write
                    held = {r.id for r in await self.store.held(AT_SERVICE)}
                    in_flight = [r for r in in_flight if r.id in held]
                if len(in_flight) >= BATCH_MIN_JOBS:
                    batch = {r.id: r for r in [*in_flight, *due]}
                    self.busy.update(batch)
                    tg.start_soon(self._check_batch, job_type, list(batch.values()), due)
                    started += 1
                    continue
            self.busy.update(r.id for r in due)
            for row in due:
                tg.start_soon(self._check, row)
                started += 1
        return started

    # -- reading --------------------------------------------------------------------

    async def _check(self, row: JobRow) -> None:
        try:
            with unless_taken_over(row.id):
                async with self.limiter:
                    await self._check_one(row)
                await self._look_again_if_hinted([row.id])
        finally:
            self.busy.discard(row.id)
            self.notify()

    async def _check_batch(self, job_type: str, rows: list[JobRow], due: list[JobRow]) -> None:
        try:
            with unless_taken_over(f"one of {len(rows)} {job_type} jobs"):  # the rest: the next pass
                missed = await self._read_list(job_type, rows, due)
                for row in missed:
                    async with self.limiter:
                        await self._check_one(row)
                await self._look_again_if_hinted([r.id for r in rows])
        finally:
            self.busy.difference_update(r.id for r in rows)
            self.notify()

    async def _look_again_if_hinted(self, job_ids: list[str]) -> None:
        """A callback that came while these jobs were being read may be newer than what was read
        (whose next look may now be far off): look at those jobs again now."""
        for job_id in [j for j in job_ids if j in self.hinted]:
            self.hinted.discard(job_id)
            if (await self.store.job(job_id)).state in AT_SERVICE:
                await self.store.check_at(job_id, self.now())

    async def _read_list(self, job_type: str, rows: list[JobRow], due: list[JobRow]) -> list[JobRow]:
        """Apply what the job list says of `rows`; the due rows it did not settle."""
        by_remote = {r.remote_id: r for r in rows}
        due_remote = {r.remote_id for r in due}
        try:
            async with self.limiter:

                async def first_page() -> list[dict[str, Any]]:
                    return await self.api.list_jobs(JobType(job_type), limit=LIST_PAGE)

                items = await retry.idempotent(first_page, self.settings.retry, f"list {job_type}")
            await self.tags.seen(items)
            found = {str(i.get("job_id")): i for i in items if i.get("job_id") in by_remote}
        except (AuthError, QuotaError):
            raise
        except (ApiError, TransportError) as exc:
            event(log, "check.list_failed", job_type=job_type, reason=exc)
            return due
        missed = []
        for remote_id, row in by_remote.items():
            item = found.get(remote_id or "")
            if item is None:
                if remote_id in due_remote:
                    missed.append(row)
                continue
            remote = parse_job(item)
            has_results = item.get("dreambooth_result") is not None or item.get("image_gen_results") is not None
            if remote.state is RemoteState.SUCCESS and not has_results:
                missed.append(row)  # a summary: the results need a GET of the job
                continue
            await self._apply(row, remote)
        return missed

    async def _check_one(self, row: JobRow) -> None:
        try:
            remote = await self.ctx.jobs.fresh(row.id)
        except NotFound:
            # The API does not know the id it gave us: keep asking, slowly.
            self.progress.pop(row.id, None)
            await self.store.update_remote(
                row.id,
                remote_state="not-found",
                percentage=None,
                next_check_at=self.now() + self.ctx.poll_policy(row.type).max_s,
                now=self.now(),
            )
            await self.problem(row.id, f"the API says job {row.remote_id} does not exist; will check again")
            return
        except (AuthError, QuotaError):
            raise
        except Exception as exc:
            event(log, "job.check_failed", job_id=row.id, state=row.state, remote_id=row.remote_id, reason=exc)
            await self.store.update_remote(
                row.id,
                remote_state=row.remote_state or "?",
                percentage=row.percentage,
                next_check_at=self.now() + self.ctx.poll_policy(row.type).max_s / 4,
                now=self.now(),
            )
            return
        await self._apply(row, remote)

    # -- what it means --------------------------------------------------------------

    async def _apply(self, row: JobRow, remote: RemoteJob) -> None:
        now = self.now()
        if remote.state is RemoteState.SUCCESS:
            self.ctx.jobs.keep(row.id, remote)  # the download stage starts from its URLs
            await self._on_success(row, remote)
            return
        self.ctx.jobs.drop(row.id)  # nothing reads the object of a job in flight or failed
        if remote.state is RemoteState.FAILURE:
            self.progress.pop(row.id, None)
            await self.store.update_remote(
                row.id, remote_state=remote.raw_state, percentage=remote.percentage_done, next_check_at=None, now=now
            )
            await self.store.move(
                row.id, JobState.FAILED, now, reason=remote.failure_reason or "the API reports failure"
            )
            await self.problem(row.id, f"failed: {remote.failure_reason or 'no reason given'}")
            return
        if remote.state is RemoteState.OTHER:
            event(
                log,
                "job.unknown_state",
                job_id=row.id,
                state=row.state,
                remote_id=row.remote_id,
                remote_state=remote.raw_state,
            )
        age = now - (row.submitted_at or now)
        policy, typical_s = self.ctx.poll_policy(row.type), await self._typical_s(row.type)
        wait = next_check_in(policy, remote, row.checks, age_s=age, typical_s=typical_s)
        remaining = remaining_s(remote, age_s=age, typical_s=typical_s)
        self.progress[row.id] = JobProgress(
            job_id=row.id,
            type=row.type,
            running=remote.state is RemoteState.RUNNING,
            percentage=remote.percentage_done,
            pace=pace(remote),
            seen_at=now,
            ends_at=None if remaining is None else now + remaining,
        )
        if self.callbacks_accepted:
            wait *= self.settings.callback_poll_relax  # callbacks arrive: polls are only a safety net
        await self.store.update_remote(
            row.id, remote_state=remote.raw_state, percentage=remote.percentage_done, next_check_at=now + wait, now=now
        )
        if remote.state is RemoteState.RUNNING and row.state is JobState.QUEUED:
            await self.store.move(row.id, JobState.RUNNING, now)

    async def _on_success(self, row: JobRow, remote: RemoteJob) -> None:
        self.progress.pop(row.id, None)
        spec = self.specs.get(row.id)
        wanted = select(remote, spec.download if spec else None)
        files = [FileRow.wanted(row.id, a) for a in wanted]
        await self.store.record_success(
            row.id, checkpoint_id=remote.final_checkpoint_id, files=files, remote_state=remote.raw_state, now=self.now()
        )
        event(log, "job.succeeded", job_id=row.id, state=JobState.SUCCEEDED, remote_id=row.remote_id, files=len(wanted))

    # -- callbacks ------------------------------------------------------------------

    async def hint(self, job_id: str, remote_id: str, marker: str) -> str:
        """A callback said `remote_id` (our `job_id`) changed: look at it now. Returns the verdict."""
        try:
            row = await self.store.job(job_id)
        except Exception:
            return "unknown-job"
        if row.remote_id != remote_id:
            return "unknown-job"
        if (remote_id, marker) in self._hints_seen:
            return "replayed"
        self._hints_seen.add((remote_id, marker))
        self.callbacks_accepted += 1
        if row.state in AT_SERVICE:
            if row.id in self.busy:
                self.hinted.add(row.id)  # the look in flight may have read the job before the change
            try:
                await self.store.check_at(row.id, self.now())
            except LeaseLost:
                return "another-worker"  # a shared campaign: the worker holding the job polls it
            self.notify()
        return "accepted"
