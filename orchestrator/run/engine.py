"""The engine: the loop that drives a run's stages over the state store, in one task group.

The store is the single source of truth; the stages keep only schedules and the latest
job objects (for their fresh URLs) in memory, so a restart loses nothing. The loop
starts work that is due (resolve, check, submit, download: each stage its own module
and limiter, all sharing one `RunContext`) and sleeps until the next thing is due or a
finished task wakes it. `run(once=True)` does one pass (check, submit, download) for
cron. `stop()` finishes what is in flight and returns; a 401 cancels everything at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from .. import output
from ..api.client import ApiClient
from ..config import RunSettings
from ..errors import AuthError, NotSent, describe_detail
from ..events import event
from ..manifest.load import Manifest, spec_fingerprint
from ..models import AT_SERVICE, TO_DOWNLOAD, JobState
from ..store import Store, SyncReport
from ..transfer.file import Downloader
from ..transfer.to_bucket import BucketFetcher
from .check import CheckStage
from .context import JobObjects, RunContext
from .download import FetchStage
from .outcome import RunOutcome, Snapshot, StopReason
from .resolve import ResolveStage
from .submit import SubmitStage

log = logging.getLogger(__name__)
IDLE_WAKE_S = 5.0  # the longest the scheduler sleeps without looking again
CHECKS_HELD = 10_000  # jobs at the service a shared campaign's worker takes: checks are light
CLAIM_EVERY_S = 1.0  # a shared campaign's worker renews its leases and claims work this often
CLAIM_AGAIN_S = 0.1  # downloads with room claim more work this soon, not sooner
DOWNLOAD_JOBS_HELD = 4  # x --max-downloads: jobs with files a worker holds, so its queue never runs dry
SNAPSHOT_EVERY_S = 0.25  # the most often the live view's numbers are read from the store


class Engine:
    def __init__(
        self,
        manifest: Manifest,
        store: Store,
        api: ApiClient,
        downloader: Downloader,
        settings: RunSettings,
        out_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        callback_base: str | None = None,
        callback_secret: str | None = None,
        to_bucket: BucketFetcher | None = None,
    ) -> None:
        self.manifest, self.store, self.downloader, self.settings = manifest, store, downloader, settings
        self.to_bucket = to_bucket
        self.out_dir, self.now = out_dir, clock
        self.ctx = RunContext(
            manifest=manifest,
            store=store,
            api=api,
            settings=settings,
            now=clock,
            jobs=JobObjects(store, api, settings),
        )
        self.events = self.ctx.events
        self.resolve = ResolveStage(self.ctx)
        self.check = CheckStage(self.ctx, self.resolve.tags)
        self.fetch = FetchStage(self.ctx, downloader, out_dir, to_bucket)
        self.submit = SubmitStage(self.ctx, self.resolve, callback_base=callback_base, callback_secret=callback_secret)
        self.snapshot = Snapshot(counts={}, stopped_by=None, transfers=(), bytes_fetched=0)
        self._published_at = float("-inf")
        self._stopping = False
        self._tg: TaskGroup | None = None
        self._room = anyio.Event()  # set when downloads have room: claim more work now

    @property
    def stopped_by(self) -> StopReason | None:
        return self.events.stopped_by

    @property
    def problems(self) -> list[str]:
        return self.events.problems

    def stop(self, reason: StopReason = StopReason.INTERRUPTED) -> None:
        """Finish what is in flight, start nothing new."""
        self._stopping = True
        self.events.stop(reason)
        self.events.notify()

    async def run(self, *, once: bool = False) -> RunOutcome:
        if self.manifest.origin is None:
            fingerprints = [spec_fingerprint(s) for s in self.manifest.jobs]
            report = await self.store.sync_manifest(
                self.manifest.campaign, self.manifest.jobs, fingerprints, self.now()
            )
        else:  # joined from the database: it has the manifest already, maybe newer than this copy
            report = SyncReport((), (), ())
        for job_id in report.changed_after_submit:
            await self.events.problem(
                job_id,
                "its configuration changed after it was submitted; the submitted job stands "
                "(give the changed job a new id to run it)",
            )
        if not self.settings.dry_run:
            await self.fetch.restore_job_files()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                keeper = anyio.CancelScope()
                if self.store.shared:  # other workers share the campaign: hold jobs before working on them
                    await self._claim_work()
                    tg.start_soon(self._keep_leases, keeper)
                await self.resolve.resolve_due()
                # A shared campaign's jobs are looked for by the worker that reads the lists (here or
                # in _keep_leases, for jobs another host's manifest added); the others wait for it.
                if (
                    not self.settings.dry_run
                    and self.check.reads_lists
                    and isinstance(await self.resolve.adopt(), NotSent)
                ):
                    self.events.stop(StopReason.UNREACHABLE)
                if once:
                    await self._one_pass()
                else:
                    await self._loop()
                await self.resolve.scan_for_duplicates()
                keeper.cancel()
        except* AuthError as group:
            exc = group.exceptions[0]
            detail = describe_detail(exc.detail) if isinstance(exc, AuthError) else str(exc)
            self.events.stopped_by = StopReason.AUTH  # over any other reason: nothing more can be done
            self.events.note(f"the API refused the key (401): {detail}; check DREAMLOOK_API_KEY")
        await self.resolve.report()
        if not self.settings.dry_run:
            manifest = self.manifest.origin or str(self.manifest.path)
            if self.to_bucket is not None:
                await output.put_summary(self.to_bucket.bucket, self.manifest.campaign, self.store, manifest=manifest)
            else:
                summary = self.out_dir / "summary.json"
                await output.write_summary(summary, self.manifest.campaign, self.store, manifest=manifest)
        await self._publish(now=True)
        return RunOutcome(
            await self.store.counts(),
            self.stopped_by,
            self.problems,
            report.changed_after_submit,
            self.settings.dry_run,
            once,
            len(await self.store.duplicates()),
            removed=await output.removed_counts(self.store),
        )

    async def _claim_work(self) -> None:
        claims = await self.store.claim_work(
            window_end=self.settings.reconcile_after(self.now()),  # a lost answer taken over: a window anew
            downloads=DOWNLOAD_JOBS_HELD * self.settings.limits.max_downloads,
            checks=CHECKS_HELD,
            checking=self.check.busy,
        )
        self.check.reads_lists = claims.reads_lists
        if self.ctx.api.budget is not None:  # the campaign's request budget, shared out evenly
            self.ctx.api.budget.share(claims.workers)
        if claims.gained:
            event(log, "worker.claimed", jobs=len(claims.gained), taken_over=len(claims.taken))
            self.events.notify()
        if claims.lost:
            event(log, "worker.lost", jobs=len(claims.lost))

    async def _keep_leases(self, scope: anyio.CancelScope) -> None:
        """Renew this worker's leases and claim more work: every CLAIM_EVERY_S, and soon after
        downloads have room (so a worker with free connections never waits long for work)."""
        with scope:
            while True:
                with anyio.move_on_after(min(CLAIM_EVERY_S, self.settings.worker_lease_s / 3)):
                    await self._room.wait()
                    await anyio.sleep(CLAIM_AGAIN_S)
                self._room = anyio.Event()
                await self._claim_work()
                if (
                    self.check.reads_lists
                    and not self.settings.dry_run
                    and self.resolve.adoption_failed is None
                    and await self.store.adoption_candidates()
                ):
                    await self.resolve.adopt()
                    self.events.notify()

    async def refresh_snapshot(self) -> None:
        """A fresh `snapshot`, for a watcher about to draw: the engine itself publishes only when
        it wakes, and may sleep for seconds while files stream (a total of bytes taken then,
        beside the files' live counters, would disagree with them)."""
        await self._publish(now=True)

    async def _publish(self, *, now: bool = False) -> None:
        """A fresh `snapshot` for whoever watches the run (the live view), a few times a second."""
        if not now and time.monotonic() - self._published_at < SNAPSHOT_EVERY_S:
            return
        self._published_at = time.monotonic()
        jobs = tuple(self.check.progress.values())
        ends = [j.ends_at for j in jobs]
        self.snapshot = Snapshot(
            counts=await self.store.counts(),
            stopped_by=self.stopped_by,
            transfers=tuple(self.downloader.transfers.values()),
            bytes_fetched=self.downloader.bytes_fetched,
            jobs=jobs,
            # The campaign's end: the last predicted end of the jobs at the service, once each has one.
            campaign_ends_at=max(e for e in ends if e is not None) if ends and None not in ends else None,
        )

    async def _loop(self, *, check: bool = True, submit: bool = True) -> None:
        """Start what is due, sleep until the next thing is due or a task ends; until nothing is left."""
        while True:
            await self._publish()
            started = await self._start_due_work(check=check, submit=submit)
            busy = bool(
                self.ctx.posting or self.resolve.busy or self.check.busy or self.fetch.active or self.fetch.preparing
            )
            if self._stopping:
                if not busy:
                    return
            elif not busy and not started and not await self._waiting_for_more(check=check, submit=submit):
                return
            await self.events.wakeup.wait(await self._sleep_for(check=check))

    async def _one_pass(self) -> None:
        """cron: check every job in flight, submit what may be, then download what is ready."""
        async with anyio.create_task_group() as tg:
            await self.check.start_due(tg, everything=True)
        async with anyio.create_task_group() as tg:
            await self.submit.start_due(tg, stopping=self._stopping)
        await self._loop(check=False, submit=False)

    async def _sleep_for(self, *, check: bool) -> float:
        due = [await self.check.next_due() if check else None, self.fetch.next_due(), await self.resolve.next_due()]
        soonest = min((d for d in due if d is not None), default=self.now() + IDLE_WAKE_S)
        # A shared campaign's worker also waits on the others' work (theirs to take over, or to see end).
        longest = CLAIM_EVERY_S if self.store.shared else IDLE_WAKE_S
        return max(0.0, min(longest, soonest - self.now()))

    async def _waiting_for_more(self, *, check: bool, submit: bool) -> bool:
        """Is anything left that this run could still move on? (In a shared campaign, a worker
        that runs until the end waits for the other workers' jobs too: it takes them over if
        their worker dies.)"""
        if check and await self.store.count(AT_SERVICE):
            return True
        if await self.fetch.has_work():
            return True
        if check and await self.store.waiting_elsewhere([*TO_DOWNLOAD, JobState.SUBMITTING]):
            return True  # another worker's (a shared campaign): taken over here if that worker stops renewing
        if submit and await self.resolve.waiting():
            return True  # a lost answer waits out its grace window, then is looked for
        # Pending jobs of the manifest that may go now: one removed from the manifest (never sent)
        # waits for nothing, and a job waiting for its checkpoint is covered by its parent's work.
        return submit and await self.submit.allowed() and bool(await self.store.ready_to_submit(1))

    async def _start_due_work(self, *, check: bool, submit: bool) -> int:
        assert self._tg is not None
        if self._stopping:
            return 0
        started = await self.check.start_due(self._tg) if check else 0
        if submit:
            started += await self.resolve.start_due(self._tg)
            started += await self.submit.start_due(self._tg, stopping=self._stopping)
        started += await self.fetch.start_due(self._tg)
        if self.store.shared and not self.fetch.queue and len(self.fetch.active) < self.settings.limits.max_downloads:
            self._room.set()
        return started
