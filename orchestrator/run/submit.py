"""The submit stage: pending jobs to paid POSTs, never one twice (rules 1 and 2).

Each batch of jobs gets its intents committed and synced before any POST goes out; each
POST's attempt time is recorded as it leaves; a job id is committed, synced, as soon as
it is known (`IdCommitter` shares one synced commit among ids that arrive together). An
answer that is lost goes to the resolve stage, never straight back to pending; a POST
that provably never left goes back to pending. 401 stops the run, 403 stops new
submissions, 422 marks the job invalid. Limits: `--max-active` jobs in flight, the
submit rate, `--max-new-jobs` per run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ..api import retry
from ..api.budget import RequestBudget
from ..api.callbacks import callback_url
from ..crashpoints import crash_point, lease_check_off
from ..errors import (
    AuthError,
    InvalidJob,
    LeaseLost,
    NotSent,
    QuotaError,
    RateLimited,
    StoreError,
    Throttled,
    describe_detail,
)
from ..events import event
from ..manifest.load import CAMPAIGN_TAG_KEY, spec_fingerprint
from ..models import IN_FLIGHT, JobSpec, JobState
from ..store import JobRow, Store
from .context import RunContext, unless_taken_over
from .outcome import StopReason
from .resolve import ResolveStage

log = logging.getLogger(__name__)
ID_COMMIT_WINDOW_S = 0.002  # job ids arriving this close together share one synced commit


class SubmitStage:
    def __init__(
        self,
        ctx: RunContext,
        resolve: ResolveStage,
        *,
        callback_base: str | None = None,
        callback_secret: str | None = None,
    ) -> None:
        self.ctx, self.resolve = ctx, resolve
        self.callback_base, self.callback_secret = callback_base, callback_secret
        limits = ctx.settings.limits
        self.submit_budget = RequestBudget(limits.submit_rate_per_s, max_wait_s=ctx.settings.budget_wait_s)
        self.submit_limiter = anyio.CapacityLimiter(max(1, limits.max_active))
        self.ids = IdCommitter(ctx.store, ctx.now)
        self.submitted_this_run = 0
        self.specs = ctx.manifest.by_id  # made once: `by_id` builds a dict of the whole manifest

    async def new_jobs_left(self) -> int | None:
        """What `--max-new-jobs` still allows (None: no cap). In a shared campaign the runs of
        the workers that overlap share it: the store counts them."""
        cap = self.ctx.settings.limits.max_new_jobs
        if cap is None:
            return None
        return cap - max(self.submitted_this_run, await self.ctx.store.new_jobs_in_round())

    async def allowed(self) -> bool:
        if self.ctx.events.stopped_by is not None or self.resolve.adoption_failed is not None:
            return False
        left = await self.new_jobs_left()
        return left is None or left > 0

    async def start_due(self, tg: TaskGroup, *, stopping: bool) -> int:
        if stopping or not await self.allowed():
            return 0
        limits = self.ctx.settings.limits
        active = await self.ctx.store.count(IN_FLIGHT)
        room = limits.max_active - active
        left = await self.new_jobs_left()
        if left is not None:
            room = min(room, left)
        if room <= 0:
            return 0
        batch: list[tuple[JobRow, JobSpec, str | None]] = []
        for row, parent_state, parent_checkpoint in await self.ctx.store.ready_to_submit(room + len(self.ctx.posting)):
            spec = self.specs.get(row.id)
            if spec is None or row.id in self.ctx.posting:
                continue
            if not row.adoption_checked and not self.ctx.settings.dry_run:
                continue  # never sent before its tag was looked for in the job list (adoption)
            if spec.checkpoint_from is not None and parent_checkpoint is None:
                # The parent ended without a checkpoint: this job can never run.
                why = f"not sent: {spec.checkpoint_from} ended {parent_state}"
                if self.ctx.settings.dry_run:
                    why = f"not sent: a dry run makes no checkpoint for {spec.checkpoint_from}"
                await self.ctx.store.move(row.id, JobState.SKIPPED, self.ctx.now(), reason=why)
                continue
            batch.append((row, spec, parent_checkpoint))
            if len(batch) >= room:
                break
        if not batch:
            return 0
        bodies = {
            row.id: _sent_body(
                spec, self.ctx.manifest.campaign, ckp, self.ctx.settings.dry_run, self._callback_for(spec.id)
            )
            for row, spec, ckp in batch
        }
        if not self.ctx.settings.dry_run:
            # The fingerprint of the spec this process sends: a job whose manifest entry changed since
            # (another host synced an edit) is not recorded, so never sent from a stale copy.
            intents = [
                (row.id, json.dumps(_storable(bodies[row.id]), sort_keys=True), spec_fingerprint(spec))
                for row, spec, _ in batch
            ]
            # Rule 1: durable before any POST. Only the jobs recorded go: other workers of a shared
            # campaign may have taken some, or filled the campaign's limits.
            recorded = set(
                await self.ctx.store.record_intents(
                    intents,
                    self.ctx.now(),
                    max_active=limits.max_active,
                    rate_per_s=limits.submit_rate_per_s,
                    max_new_jobs=limits.max_new_jobs,
                )
            )
            batch = [item for item in batch if item[0].id in recorded]
            crash_point("after-intent")
        for row, spec, _ in batch:
            self.ctx.posting.add(row.id)
            self.submitted_this_run += 1
            tg.start_soon(self._submit, spec, bodies[row.id])
        return len(batch)

    async def _submit(self, spec: JobSpec, body: dict[str, Any]) -> None:
        try:
            with unless_taken_over(spec.id):
                await self._submit_limited(spec, body)
        finally:
            self.ctx.posting.discard(spec.id)
            self.ctx.events.notify()

    async def _submit_limited(self, spec: JobSpec, body: dict[str, Any]) -> None:
        async with self.submit_limiter:
            try:
                await self.submit_budget.acquire()
            except Throttled as exc:
                event(log, "job.not_sent", job_id=spec.id, state=JobState.PENDING, reason=exc)
                await self._back_to_pending(spec.id)  # not sent: the next pass takes it again
                return
            await self._submit_once(spec, body)

    async def _submit_once(self, spec: JobSpec, body: dict[str, Any]) -> None:
        job_id = spec.id

        async def post() -> str:
            if not self.ctx.settings.dry_run:  # each attempt starts a grace window of its own
                sent_at = self.ctx.now()
                window_end = self.ctx.settings.reconcile_after(sent_at)
                # Sent only while this worker holds the job for the POST's whole timeout and more.
                needs = self.ctx.settings.post_needs_s
                checked = time.monotonic()
                try:
                    held = await self.ctx.store.record_attempt(job_id, sent_at, window_end, need_s=needs)
                except LeaseLost:
                    raise
                except StoreError as exc:  # before the POST: nothing was sent, so no answer is lost
                    raise NotSent(f"submit {job_id}: not sent: its attempt could not be recorded ({exc})") from exc
                if not held and not lease_check_off():
                    raise LeaseLost(job_id)
                # A shared campaign's lease now has twice what the POST needs left: it leaves within one.
                send_by = checked + needs if self.ctx.store.shared else None
                return await self.ctx.api.submit(spec.type, body, send_by=send_by)
            return await self.ctx.api.submit(spec.type, body)

        try:
            remote_id = await retry.submission(post, self.ctx.settings.retry, f"submit {job_id}")
        except LeaseLost:
            # Not sent by this worker now: whoever holds the job finds it by tag after its window.
            event(
                log,
                "job.not_sent",
                job_id=job_id,
                state=JobState.SUBMITTING,
                reason="this worker's lease on it ran out before the POST",
            )
            return
        except InvalidJob as exc:
            await self.ctx.store.move(
                job_id,
                JobState.INVALID,
                self.ctx.now(),
                reason=f"the API refused it (422): {describe_detail(exc.detail)}",
            )
            await self.ctx.events.problem(job_id, f"invalid: {describe_detail(exc.detail)}")
            return
        except QuotaError as exc:
            await self._back_to_pending(job_id)
            self.ctx.events.stop(
                StopReason.QUOTA,
                f"the API refused new jobs (403): {describe_detail(exc.detail)}; "
                "jobs already submitted are still followed and downloaded",
            )
            return
        except AuthError:
            await self._back_to_pending(job_id)
            raise
        except (Throttled, RateLimited) as exc:
            event(log, "job.not_sent", job_id=job_id, state=JobState.PENDING, reason=exc)
            await self._back_to_pending(job_id)  # provably nothing was created
            return
        except NotSent as exc:
            # Never left (no connection, a URL it cannot send to), even after retries: nothing
            # was created, so not `unknown`; and sending more now would fail alike.
            await self._back_to_pending(job_id)
            why = f"{exc}; no new jobs are sent in this run (nothing was created): run again later"
            self.ctx.events.stop(StopReason.UNREACHABLE, why)
            return
        except Exception as exc:  # the answer is lost: the job may or may not exist
            if self.ctx.settings.dry_run:
                await self.ctx.events.problem(job_id, f"dry run not confirmed: {exc}")
                return
            await self.resolve.answer_lost(job_id, exc)  # the service may still be creating it
            return
        if self.ctx.settings.dry_run:
            await self.ctx.store.move(
                job_id, JobState.DRY_RUN_OK, self.ctx.now(), reason=f"accepted by the API as {remote_id}"
            )
            return
        crash_point("after-post")
        await self.ids.commit(job_id, remote_id, self.ctx.first_check(spec.type.value))
        event(log, "job.submitted", job_id=job_id, state=JobState.QUEUED, remote_id=remote_id)

    def _callback_for(self, job_id: str) -> str | None:
        if self.callback_base is None or self.callback_secret is None or self.ctx.settings.dry_run:
            return None
        return callback_url(self.callback_base, self.callback_secret, job_id)

    async def _back_to_pending(self, job_id: str) -> None:
        if not self.ctx.settings.dry_run:
            await self.ctx.store.move(job_id, JobState.PENDING, self.ctx.now())


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
                    for job_id in await self.store.mark_submitted_many(batch, self.now()):
                        event(log, "job.answer_after_takeover", job_id=job_id)
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
