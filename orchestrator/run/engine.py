"""The engine: submit, check and download stages over the state store, in one task group.

The store is the single source of truth; the engine keeps only schedules and the
latest job objects (for their fresh URLs) in memory, so a restart loses nothing.
One scheduler loop starts work that is due and sleeps until the next thing is due
or a finished task wakes it; each stage has its own limiter. `run(once=True)` does
one pass (check, submit, download) for cron. `stop()` finishes what is in flight
and returns; a 401 cancels everything at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import output
from ..api import retry
from ..api.budget import RequestBudget
from ..api.callbacks import callback_url
from ..api.client import ApiClient
from ..api.jobs import parse_job
from ..config import RunSettings
from ..crashpoints import crash_point
from ..errors import AuthError, InvalidJob, NotSent, QuotaError, RateLimited, Throttled, describe_detail
from ..manifest.load import CAMPAIGN_TAG_KEY, Manifest, spec_fingerprint
from ..models import AT_SERVICE, IN_FLIGHT, JobSpec, JobState, JobType, RemoteJob
from ..store import JobRow, Store
from ..transfer.file import Downloader
from .check import CheckStage
from .download import FetchStage
from .outcome import RunOutcome, Snapshot, StopReason
from .resolve import ResolveStage
from .schedule import Wakeup, next_check_in

log = logging.getLogger(__name__)
IDLE_WAKE_S = 5.0  # the longest the scheduler sleeps without looking again
SNAPSHOT_EVERY_S = 0.25  # the most often the live view's numbers are read from the store
ID_COMMIT_WINDOW_S = 0.002  # job ids arriving this close together share one synced commit


def _sent_body(
    spec: JobSpec, campaign: str, checkpoint_id: str | None, dry_run: bool, callback: str | None
) -> dict[str, Any]:
    body = dict(spec.payload)
    if callback is not None:
        body["callback"] = callback
    if checkpoint_id is not None:
        body["checkpoint_id"] = checkpoint_id
    tags = [t for t in body.get("tags") or [] if t.get("key") != CAMPAIGN_TAG_KEY]
    body["tags"] = [*tags, {"key": CAMPAIGN_TAG_KEY, "value": f"{campaign}/{spec.id}"}]
    if dry_run:
        body["dry_run"] = True
    return body


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
    ) -> None:
        self.manifest = manifest
        self.callback_base, self.callback_secret = callback_base, callback_secret
        self.specs = manifest.by_id
        self.store = store
        self.api = api
        self.downloader = downloader
        self.settings = settings
        self.out_dir = out_dir
        self.now = clock
        self.submit_budget = RequestBudget(settings.limits.submit_rate_per_s, max_wait_s=settings.budget_wait_s)
        self.submit_limiter = anyio.CapacityLimiter(max(1, settings.limits.max_active))
        # The latest job object of each job being downloaded (its fresh URLs, its job.json):
        # dropped when the job ends, so it holds the downloads in hand, not the campaign.
        self.remote: dict[str, RemoteJob] = {}
        self.busy: set[str] = set()  # job ids with a task in flight
        self.submitted_this_run = 0
        self.stopped_by: StopReason | None = None
        self.problems: list[str] = []
        self._problems_seen: set[str] = set()
        self.resolve = ResolveStage(
            store=store,
            api=api,
            settings=settings,
            campaign=manifest.campaign,
            submitting=self.busy,
            first_check=self._first_check,
            problem=self._problem,
            notes=self.problems,
            notify=self._notify,
            now=clock,
        )
        self.wakeup = Wakeup()
        self.ids = IdCommitter(store, clock)
        self._stopping = False
        self._tg: TaskGroup | None = None
        self.snapshot = Snapshot(counts={}, stopped_by=None, transfers=(), bytes_fetched=0)
        self._published_at = float("-inf")
        self.check = CheckStage(
            store=store,
            api=api,
            settings=settings,
            specs=self.specs,
            remote=self.remote,
            fresh=self._fresh,
            problem=self._problem,
            notify=self._notify,
            now=clock,
            seen_listing=self.resolve.tags.seen,
        )
        self.fetch = FetchStage(
            store=store,
            downloader=downloader,
            settings=settings,
            out_dir=out_dir,
            remote=self.remote,
            fresh=self._fresh,
            problem=self._problem,
            notify=self._notify,
            now=clock,
        )

    # -- control --------------------------------------------------------------------

    def stop(self, reason: StopReason = StopReason.INTERRUPTED) -> None:
        """Finish what is in flight, start nothing new."""
        self._stopping = True
        self.stopped_by = self.stopped_by or reason
        self._notify()

    def _notify(self) -> None:
        self.wakeup.notify()

    async def _publish(self, *, now: bool = False) -> None:
        """A fresh `snapshot` for whoever watches the run (the live view), a few times a second."""
        if not now and time.monotonic() - self._published_at < SNAPSHOT_EVERY_S:
            return
        self._published_at = time.monotonic()
        self.snapshot = Snapshot(
            counts=await self.store.counts(),
            stopped_by=self.stopped_by,
            transfers=tuple(self.downloader.transfers.values()),
            bytes_fetched=self.downloader.bytes_fetched,
        )

    def _problem(self, job_id: str, message: str) -> None:
        """Tell the user once per job and message: a re-check that finds the same thing
        again (a job the API does not know, say) must not grow the list with the campaign."""
        line = f"{job_id}: {message}"
        if line in self._problems_seen:
            log.info("job.problem_again job_id=%s %s", job_id, message)
            return
        self._problems_seen.add(line)
        self.problems.append(line)
        log.warning("job.problem job_id=%s %s", job_id, message)

    async def run(self, *, once: bool = False) -> RunOutcome:
        fingerprints = [spec_fingerprint(s) for s in self.manifest.jobs]
        report = await self.store.sync_manifest(self.manifest.campaign, self.manifest.jobs, fingerprints, self.now())
        for job_id in report.changed_after_submit:
            self._problem(
                job_id,
                "its configuration changed after it was submitted; the submitted job stands "
                "(give the changed job a new id to run it)",
            )
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self.resolve.resolve_due()
                if not self.settings.dry_run and isinstance(await self.resolve.adopt(), NotSent):
                    self.stopped_by = self.stopped_by or StopReason.UNREACHABLE
                if once:
                    await self._one_pass()
                else:
                    await self._loop()
                await self.resolve.scan_for_duplicates()
        except* AuthError as group:
            exc = group.exceptions[0]
            detail = describe_detail(exc.detail) if isinstance(exc, AuthError) else str(exc)
            self.stopped_by = StopReason.AUTH
            self.problems.append(f"the API refused the key (401): {detail}; check DREAMLOOK_API_KEY")
        await self.resolve.report()
        await self._write_summary()
        await self._publish(now=True)
        return RunOutcome(
            await self.store.counts(),
            self.stopped_by,
            self.problems,
            report.changed_after_submit,
            self.settings.dry_run,
            once,
            len(await self.store.duplicates()),
        )

    async def _loop(self, *, check: bool = True, submit: bool = True) -> None:
        """Start what is due, sleep until the next thing is due or a task ends; until nothing is left."""
        while True:
            await self._publish()
            started = await self._start_due_work(check=check, submit=submit)
            busy = bool(self.busy or self.resolve.busy or self.check.busy or self.fetch.active or self.fetch.preparing)
            if self._stopping:
                if not busy:
                    return
            elif not busy and not started and not await self._waiting_for_more(check=check, submit=submit):
                return
            await self.wakeup.wait(await self._sleep_for(check=check))

    async def _one_pass(self) -> None:
        """cron: check every job in flight, submit what may be, then download what is ready."""
        async with anyio.create_task_group() as tg:
            await self.check.start_due(tg, everything=True)
        async with anyio.create_task_group() as tg:
            await self._start_submissions(tg)
        await self._loop(check=False, submit=False)

    async def _sleep_for(self, *, check: bool) -> float:
        due = [await self.check.next_due() if check else None, self.fetch.next_due(), await self.resolve.next_due()]
        soonest = min((d for d in due if d is not None), default=self.now() + IDLE_WAKE_S)
        return max(0.0, min(IDLE_WAKE_S, soonest - self.now()))

    async def _waiting_for_more(self, *, check: bool, submit: bool) -> bool:
        """Is anything left that this run could still move on?"""
        if check and await self.store.count(AT_SERVICE):
            return True
        if await self.fetch.has_work():
            return True
        if submit and await self.resolve.waiting():
            return True  # a lost answer waits out its grace window, then is looked for
        return submit and self._submissions_allowed() and bool(await self.store.count([JobState.PENDING]))

    async def _start_due_work(self, *, check: bool, submit: bool) -> int:
        assert self._tg is not None
        if self._stopping:
            return 0
        started = await self.check.start_due(self._tg) if check else 0
        if submit:
            started += await self.resolve.start_due(self._tg)
            started += await self._start_submissions(self._tg)
        return started + await self.fetch.start_due(self._tg)

    # -- submitting -----------------------------------------------------------------

    def _submissions_allowed(self) -> bool:
        cap = self.settings.limits.max_new_jobs
        return (
            self.stopped_by is None
            and self.resolve.adoption_failed is None
            and (cap is None or self.submitted_this_run < cap)
        )

    async def _start_submissions(self, tg: TaskGroup) -> int:
        if not self._submissions_allowed() or self._stopping:
            return 0
        active = await self.store.count(IN_FLIGHT)
        room = self.settings.limits.max_active - active
        cap = self.settings.limits.max_new_jobs
        if cap is not None:
            room = min(room, cap - self.submitted_this_run)
        if room <= 0:
            return 0
        batch: list[tuple[JobRow, JobSpec, str | None]] = []
        for row, parent_state, parent_checkpoint in await self.store.ready_to_submit(room + len(self.busy)):
            spec = self.specs.get(row.id)
            if spec is None or row.id in self.busy:
                continue
            if not row.adoption_checked and not self.settings.dry_run:
                continue  # never sent before its tag was looked for in the job list (adoption)
            if spec.checkpoint_from is not None and parent_checkpoint is None:
                # The parent ended without a checkpoint: this job can never run.
                why = f"not sent: {spec.checkpoint_from} ended {parent_state}"
                if self.settings.dry_run:
                    why = f"not sent: a dry run makes no checkpoint for {spec.checkpoint_from}"
                await self.store.move(row.id, JobState.SKIPPED, self.now(), reason=why)
                continue
            batch.append((row, spec, parent_checkpoint))
            if len(batch) >= room:
                break
        if not batch:
            return 0
        bodies = {
            row.id: _sent_body(spec, self.manifest.campaign, ckp, self.settings.dry_run, self._callback_for(spec.id))
            for row, spec, ckp in batch
        }
        if not self.settings.dry_run:
            intents = [
                (row.id, json.dumps(_storable(bodies[row.id]), sort_keys=True), row.fingerprint) for row, _, _ in batch
            ]
            await self.store.record_intents(intents, self.now())  # rule 1: durable before any POST
            crash_point("after-intent")
        for row, spec, _ in batch:
            self.busy.add(row.id)
            self.submitted_this_run += 1
            tg.start_soon(self._submit, spec, bodies[row.id])
        return len(batch)

    async def _submit(self, spec: JobSpec, body: dict[str, Any]) -> None:
        try:
            async with self.submit_limiter:
                try:
                    await self.submit_budget.acquire()
                except Throttled as exc:
                    log.info("job.not_sent job_id=%s why=%s", spec.id, exc)
                    await self._back_to_pending(spec.id)  # not sent: the next pass takes it again
                    return
                await self._submit_once(spec, body)
        finally:
            self.busy.discard(spec.id)
            self._notify()

    async def _submit_once(self, spec: JobSpec, body: dict[str, Any]) -> None:
        job_id = spec.id

        async def post() -> str:
            if not self.settings.dry_run:  # each attempt starts a grace window of its own
                sent_at = self.now()
                await self.store.record_attempt(job_id, sent_at, self.settings.reconcile_after(sent_at))
            return await self.api.submit(spec.type, body)

        try:
            remote_id = await retry.submission(post, self.settings.retry, f"submit {job_id}")
        except InvalidJob as exc:
            await self.store.move(
                job_id,
                JobState.INVALID,
                self.now(),
                reason=f"the API refused it (422): {describe_detail(exc.detail)}",
            )
            self._problem(job_id, f"invalid: {describe_detail(exc.detail)}")
            return
        except QuotaError as exc:
            await self._back_to_pending(job_id)
            if self.stopped_by is None:
                self.stopped_by = StopReason.QUOTA
                self.problems.append(
                    f"the API refused new jobs (403): {describe_detail(exc.detail)}; "
                    "jobs already submitted are still followed and downloaded"
                )
            return
        except AuthError:
            await self._back_to_pending(job_id)
            raise
        except (Throttled, RateLimited) as exc:
            log.info("job.not_sent job_id=%s why=%s", job_id, exc)
            await self._back_to_pending(job_id)  # provably nothing was created
            return
        except NotSent as exc:
            # Never left (no connection, a URL it cannot send to), even after retries: nothing
            # was created, so not `unknown`; and sending more now would fail alike.
            await self._back_to_pending(job_id)
            if self.stopped_by is None:
                self.stopped_by = StopReason.UNREACHABLE
                self.problems.append(f"{exc}; no new jobs are sent in this run (nothing was created): run again later")
            return
        except Exception as exc:  # the answer is lost: the job may or may not exist
            if self.settings.dry_run:
                self._problem(job_id, f"dry run not confirmed: {exc}")
                return
            await self.resolve.answer_lost(job_id, exc)  # the service may still be creating it
            return
        if self.settings.dry_run:
            await self.store.move(job_id, JobState.DRY_RUN_OK, self.now(), reason=f"accepted by the API as {remote_id}")
            return
        crash_point("after-post")
        await self.ids.commit(job_id, remote_id, self._first_check(spec.type.value))
        log.info("job.submitted job_id=%s remote_id=%s", job_id, remote_id)

    def _first_check(self, job_type: str) -> float:
        return self.now() + next_check_in(self.check.policy(job_type), None, 0)

    def _callback_for(self, job_id: str) -> str | None:
        if self.callback_base is None or self.callback_secret is None or self.settings.dry_run:
            return None
        return callback_url(self.callback_base, self.callback_secret, job_id)

    async def _back_to_pending(self, job_id: str) -> None:
        if not self.settings.dry_run:
            await self.store.move(job_id, JobState.PENDING, self.now())

    # -- reading a job --------------------------------------------------------------

    async def _fresh(self, job_id: str) -> RemoteJob:
        """GET the job (retried), parsed, and kept: its URLs are signed anew on every GET."""
        row = await self.store.job(job_id)
        raw = await retry.idempotent(
            lambda: self.api.get_job(JobType(row.type), row.remote_id or ""), self.settings.retry, f"get {job_id}"
        )
        remote = parse_job(raw)
        self.remote[job_id] = remote
        return remote

    # -- summary --------------------------------------------------------------------

    async def _write_summary(self) -> None:
        if self.settings.dry_run:
            return
        await output.write_summary(
            self.out_dir / "summary.json", self.manifest.campaign, self.store, manifest=str(self.manifest.path)
        )


class IdCommitter:
    """Rule 1 at scale: job ids that arrive within `ID_COMMIT_WINDOW_S` are synced in one
    transaction, and each caller returns only once its own id is durable."""

    def __init__(self, store: Store, now: Callable[[], float]) -> None:
        self.store, self.now = store, now
        self._pending: list[tuple[str, str, float | None]] = []
        self._committed = anyio.Event()
        self._error: BaseException | None = None
        self._flushing = False

    async def commit(self, job_id: str, remote_id: str, next_check_at: float | None) -> None:
        self._pending.append((job_id, remote_id, next_check_at))
        committed = self._committed
        if self._flushing:
            await committed.wait()
        else:
            self._flushing = True  # this caller flushes for all that arrive meanwhile
            try:
                await anyio.sleep(ID_COMMIT_WINDOW_S)
            finally:
                batch, self._pending = self._pending, []
                self._committed, self._flushing = anyio.Event(), False
                try:
                    await self.store.mark_submitted_many(batch, self.now())
                    self._error = None
                except BaseException as exc:
                    self._error = exc
                    raise
                finally:
                    committed.set()
        if self._error is not None:
            raise self._error


def _storable(body: dict[str, Any]) -> dict[str, Any]:
    """What we keep of a sent body: no callback URL (it carries a secret)."""
    return {k: v for k, v in body.items() if k != "callback"}
