"""The download stage: every chosen file of every succeeded job, earliest deadline first.

A file's deadline is the sooner of its URL's expiry and its deletion (retention after
training ends), so images (1 h URLs) go before checkpoints (48 h). At most
`max_downloads` files are in flight. A job is finished when its last file is placed:
`done`, or `lost` if the service deleted one first. A file that keeps failing is
queued again a few times, then left for the next run, and the user is told.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from .. import output
from ..errors import (
    ApiError,
    AuthError,
    BucketError,
    DownloadError,
    FileGone,
    KeyTaken,
    NoSpace,
    OutputError,
    QuotaError,
    StoreError,
    TransportError,
)
from ..events import about_job, event
from ..models import TO_DOWNLOAD, Artifact, JobState, RemoteJob
from ..store import Store
from ..store.parts import PartRecord, Span
from ..transfer.file import Downloader
from ..transfer.to_bucket import BucketFetcher, Stored, UploadLog
from ..transfer.urls import expires_at
from ..transfer.verify import Fetched
from .context import RunContext, unless_taken_over

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Queued:
    deadline: float
    not_before: float
    seq: int
    job_id: str = field(compare=False)
    remote_id: str = field(compare=False)


class StorePartLog:
    """A partial download's memory (its object and proven spans), kept in the state store."""

    def __init__(self, store: Store, job_id: str, remote_id: str) -> None:
        self.store, self.job_id, self.remote_id = store, job_id, remote_id
        self.suffix = store.part_suffix(job_id)

    async def record(self) -> PartRecord | None:
        return await self.store.part_record(self.job_id, self.remote_id)

    async def start_over(self, size: int | None) -> None:
        await self.store.part_start_over(self.job_id, self.remote_id, size)

    async def set_etag(self, etag: str | None) -> None:
        await self.store.part_set_etag(self.job_id, self.remote_id, etag)

    async def prove(self, offset: int, length: int) -> None:
        await self.store.part_prove(self.job_id, self.remote_id, offset, length)

    async def keep_only(self, spans: Iterable[Span]) -> None:
        await self.store.part_keep_only(self.job_id, self.remote_id, list(spans))


class FetchStage:
    def __init__(
        self, ctx: RunContext, downloader: Downloader, out_dir: Path, to_bucket: BucketFetcher | None = None
    ) -> None:
        self.ctx, self.downloader, self.out_dir = ctx, downloader, out_dir
        self.to_bucket = to_bucket  # `--out s3://...`: files go straight into the bucket
        self.store, self.settings, self.now = ctx.store, ctx.settings, ctx.now
        self.problem, self.notify = ctx.events.problem, ctx.events.notify
        self.queue: list[_Queued] = []
        self.preparing: set[str] = set()
        self.prepared: set[str] = set()
        self.active: set[tuple[str, str]] = set()
        self.rounds: dict[tuple[str, str], int] = {}
        self.given_up: set[str] = set()
        self._seq = 0
        self._swept = False
        self.queued_per_job: dict[str, int] = {}
        self._delayed = 0  # queued items with a not_before: only they make next_due worth computing

    # -- what is left ---------------------------------------------------------------

    async def has_work(self) -> bool:
        """Anything this stage could still move on in this run?"""
        if self.queue or self.active or self.preparing or not self._swept:
            return True
        if self.store.shared:
            return bool(await self.store.held([JobState.SUCCEEDED]))
        return await self.store.count([JobState.SUCCEEDED]) > 0

    def next_due(self) -> float | None:
        if not self._delayed:
            return None
        return min((q.not_before for q in self.queue), default=None)

    async def restore_job_files(self) -> None:
        """Finished jobs' job.json and SHA256SUMS as the store has them: written unsynced, a
        crash may have lost them (a bucket's PUTs are durable: nothing to check there)."""
        if self.to_bucket is None:
            try:
                restored = await output.restore_job_files(self.store, self.out_dir)
            except OutputError as exc:  # nothing is lost: the store still has them, the next run tries again
                self.ctx.events.note(
                    f"{exc}: finished jobs' job.json and SHA256SUMS not all checked; the next run does"
                )
                return
            for job_id in restored:
                event(log, "job.files_restored", job_id=job_id)

    # -- starting work --------------------------------------------------------------

    async def start_due(self, tg: TaskGroup) -> int:
        started = 0
        # Jobs left `downloading` by an earlier run are swept once; after that only new successes
        # (in a shared campaign, downloads taken over from another worker come `downloading`).
        states = [JobState.SUCCEEDED] if self._swept and not self.store.shared else TO_DOWNLOAD
        self._swept = True
        # One process alone reads ids (an index lookup); a worker, the rows of the jobs it holds.
        job_ids = [r.id for r in await self.store.held(states)] if self.store.shared else await self.store.ids(states)
        for job_id in job_ids:
            if job_id not in self.prepared and job_id not in self.preparing and job_id not in self.given_up:
                self.preparing.add(job_id)
                tg.start_soon(self._prepare, job_id)
                started += 1
        now = self.now()
        held: list[_Queued] = []
        while self.queue and len(self.active) < self.settings.limits.max_downloads:
            item = heapq.heappop(self.queue)
            if item.not_before > now:
                held.append(item)
                continue
            self._delayed -= 1 if item.not_before else 0
            self.queued_per_job[item.job_id] -= 1
            self.active.add((item.job_id, item.remote_id))
            tg.start_soon(self._fetch, item.job_id, item.remote_id)
            started += 1
        for item in held:
            heapq.heappush(self.queue, item)
        return started

    def _deadline(self, artifact: Artifact, remote: RemoteJob) -> float:
        url_dies = expires_at(artifact.url)
        deleted = (remote.finished_at or self.now()) + self.settings.retention_s
        return min(deleted, url_dies) if url_dies is not None else deleted

    def _enqueue(self, job_id: str, artifact: Artifact, remote: RemoteJob, not_before: float = 0.0) -> None:
        self._seq += 1
        self._delayed += 1 if not_before else 0
        self.queued_per_job[job_id] = self.queued_per_job.get(job_id, 0) + 1
        heapq.heappush(
            self.queue, _Queued(self._deadline(artifact, remote), not_before, self._seq, job_id, artifact.remote_id)
        )

    async def _prepare(self, job_id: str) -> None:
        """Queue the job's pending files, with deadlines from a job object with live URLs."""
        try:
            with unless_taken_over(job_id, lambda: self._let_go(job_id)):
                await self._queue_files(job_id)
        except (StoreError, AuthError, QuotaError):
            raise
        except (ApiError, TransportError) as exc:
            self.given_up.add(job_id)
            await self.problem(job_id, f"could not read the job to download its files: {exc}; run again to retry")
        except BucketError as exc:  # looking for its files in the bucket failed: nothing is lost, try later
            self.given_up.add(job_id)
            await self.problem(job_id, f"{exc}; run again to retry")
        finally:
            self.preparing.discard(job_id)
            self.notify()

    async def _queue_files(self, job_id: str) -> None:
        """Queue the job's pending files, with deadlines from a job object with live URLs."""
        row = await self.store.job(job_id)
        if row.state is JobState.SUCCEEDED:
            await self.store.move(job_id, JobState.DOWNLOADING, self.now())
        folder = self.out_dir / job_id
        files = await self.store.files(job_id)
        # A file recorded as done must be on disk, or in the bucket (a power cut, or a person, may have lost it).
        done = [f for f in files if f.done]
        if self.to_bucket is not None:
            bucket = self.to_bucket.bucket
            present = {f.name for f in done if await bucket.size_of(bucket.url.key(job_id, f.name)) is not None}
        elif done:
            present = await anyio.to_thread.run_sync(lambda: {f.name for f in done if (folder / f.name).exists()})
        else:
            present = set()
        missing = [f for f in done if f.name not in present]
        for f in missing:
            await self.store.file_missing(job_id, f.remote_id)
            event(log, "file.missing", job_id=job_id, file=f.name)
        if missing:  # read again only if it changed
            files = await self.store.files(job_id)
        pending = [f for f in files if not f.done and not f.lost]
        remote = self.ctx.jobs.get(job_id) or await self.ctx.jobs.fresh(job_id)
        by_id = {a.remote_id: a for a in remote.artifacts}
        for file in pending:
            artifact = by_id.get(file.remote_id)
            if artifact is None or not artifact.available:
                await self._lost(job_id, file.remote_id)
                await self.problem(job_id, f"lost {file.name}: the service no longer offers it")
            else:
                self._enqueue(job_id, artifact, remote)
        self.prepared.add(job_id)
        await self._finish_if_complete(job_id)

    async def _fetch(self, job_id: str, remote_id: str) -> None:
        key = (job_id, remote_id)
        try:
            with unless_taken_over(job_id, lambda: self._let_go(job_id)), about_job(job_id):
                await self._fetch_file(job_id, remote_id)
        finally:
            self.active.discard(key)
            with anyio.CancelScope(shield=True), unless_taken_over(job_id, lambda: self._let_go(job_id)):
                await self._finish_if_complete(job_id)
            self.notify()

    async def _fetch_file(self, job_id: str, remote_id: str) -> None:
        remote = self.ctx.jobs.get(job_id) or await self.ctx.jobs.fresh(job_id)
        artifact = next((a for a in remote.artifacts if a.remote_id == remote_id), None)
        name = artifact.name if artifact else remote_id

        async def renew() -> Artifact:
            fresh = await self.ctx.jobs.fresh(job_id)
            found = next((a for a in fresh.artifacts if a.remote_id == remote_id), None)
            if found is None or not found.available:
                raise FileGone(f"{name}: the service no longer offers it")
            return found

        try:
            if artifact is None or not artifact.available:
                raise FileGone(f"{name}: the service no longer offers it")
            if self.to_bucket is not None:
                got: Fetched | Stored = await self.to_bucket.fetch(
                    artifact,
                    job_id,
                    renew,
                    UploadLog(self.store, job_id, remote_id),
                    renew_margin_s=self.settings.url_renew_margin_s,
                )
            else:
                got = await self.downloader.fetch(
                    artifact,
                    self.out_dir / job_id,
                    renew,
                    StorePartLog(self.store, job_id, remote_id),
                    renew_margin_s=self.settings.url_renew_margin_s,
                )
        except FileGone as exc:
            await self._lost(job_id, remote_id)
            await self.problem(job_id, f"lost {name}: {exc}")
            return
        except KeyTaken as exc:  # another object holds its key: never overwritten, no use trying again
            self.given_up.add(job_id)
            await self.problem(job_id, str(exc))
            return
        except (AuthError, QuotaError):
            raise
        except NoSpace as exc:  # no use trying again in this run: the part waits for space
            self.given_up.add(job_id)
            await self.problem(job_id, str(exc))
            return
        except (DownloadError, OSError, ApiError, TransportError) as exc:  # renewing a URL can fail too
            rounds = self.rounds.get((job_id, remote_id), 0) + 1
            self.rounds[(job_id, remote_id)] = rounds
            if rounds < self.settings.download_rounds and artifact is not None:
                event(log, "file.requeued", job_id=job_id, file=name, reason=exc)
                self._enqueue(job_id, artifact, remote, not_before=self.now() + self.settings.download_requeue_s)
            else:
                self.given_up.add(job_id)
                await self.problem(job_id, f"{name} could not be downloaded ({exc}); run again to resume it")
            return
        await self.store.file_done(job_id, remote_id, got.sha256, got.size)
        event(log, "file.done", job_id=job_id, file=name, bytes=got.size)

    async def _lost(self, job_id: str, remote_id: str) -> None:
        """The service deleted the file: recorded lost, and a bucket upload of it aborted (its
        parts would be billed for nothing)."""
        if self.to_bucket is not None:
            await self.to_bucket.abandon(UploadLog(self.store, job_id, remote_id))
        await self.store.file_lost(job_id, remote_id)

    def _let_go(self, job_id: str) -> None:
        """Another worker holds the job now: nothing of it stays queued here."""
        if self.queued_per_job.get(job_id):
            self.queue = [q for q in self.queue if q.job_id != job_id]
            heapq.heapify(self.queue)
            self._delayed = sum(1 for q in self.queue if q.not_before)
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        """A finished job needs nothing in memory: the store has it all."""
        self.ctx.jobs.drop(job_id)
        self.queued_per_job.pop(job_id, None)
        self.prepared.discard(job_id)

    async def _finish_if_complete(self, job_id: str) -> None:
        if job_id not in self.prepared or self.queued_per_job.get(job_id):
            return
        if any(j == job_id for j, _ in self.active):
            return
        files = await self.store.files(job_id)
        if any(not f.done and not f.lost for f in files):
            return
        remote = self.ctx.jobs.get(job_id)
        job_json = None
        if remote is not None:  # unsynced, and the folder synced once for all its files; the store keeps job.json
            job_json, sums = output.job_files(remote.raw, files)
            try:
                if self.to_bucket is not None:
                    await output.put_job_files(self.to_bucket.bucket, job_id, job_json, sums)
                else:
                    await output.write_job_files(self.out_dir / job_id, job_json, sums)
            except OutputError as exc:  # its files are placed and recorded: the next run writes these again
                self.given_up.add(job_id)
                self.ctx.jobs.drop(job_id)
                await self.problem(job_id, f"{exc}; the job stays downloading and the next run finishes it")
                return
        self._forget(job_id)
        lost = [f.name for f in files if f.lost]
        if lost:
            why = f"deleted by the service before download: {', '.join(lost)}"
            await self.store.move(job_id, JobState.LOST, self.now(), reason=why, job_json=job_json)
        else:
            await self.store.move(job_id, JobState.DONE, self.now(), job_json=job_json)
            event(
                log,
                "job.done",
                job_id=job_id,
                state=JobState.DONE,
                files=len(files),
                remote_id=remote.job_id if remote else None,
            )
