"""`SqliteStore`: the `Store` over one SQLite file, off the event loop, with group commit.

Every verb of `SqliteDb` (store/sqlite.py, where all the SQL is) runs on the store's own
thread, one at a time, in the order called: the connection is never used by two threads,
and a synced commit never blocks the event loop. Verbs that arrive while the thread is busy
(committing the last batch: an fsync takes a millisecond or more) wait in a queue and then
run together in one transaction with one commit, synced if any of them must be (an intent,
a remote id, a file's `done`): group commit. Each verb's change is a SAVEPOINT, so a verb
that fails undoes only its own change and fails only its own caller; if the transaction
itself is lost (a commit refused, an I/O error), the batch's verbs run again one by one,
each in its own transaction, and each caller learns its own outcome.

A caller learns its verb's answer only once the commit holding its change has returned
(synced, if the change must be): a kill -9 can only lose changes nobody was told were
made. A verb handed to the thread is done even if its caller is cancelled meanwhile, so
a commit is never cut in half.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio

from ..errors import StoreError
from ..events import event
from ..models import JobSpec, JobState
from .base import Claims, FileRow, JobRow, SyncReport, UploadedPart, UploadRecord, WorkerRow
from .parts import PartRecord
from .sqlite import SqliteDb

T = TypeVar("T")
log = logging.getLogger(__name__)

BATCH_MAX_VERBS = 500  # at most this many verbs share one commit: the first of them waits for all


class _Call:
    """A verb handed to the store's thread, and, once its batch is committed, its outcome."""

    __slots__ = ("durable", "error", "future", "ran", "repeatable", "result", "verb")

    def __init__(
        self, verb: Callable[[], Any], future: asyncio.Future[Any], *, durable: bool, repeatable: bool
    ) -> None:
        self.verb, self.future, self.durable, self.repeatable = verb, future, durable, repeatable
        self.result: Any = None
        self.error: BaseException | None = None
        self.ran = False

    def run(self) -> None:
        if self.ran and not self.repeatable:
            return  # it read on (a cursor): its first outcome stands
        self.ran = True
        try:
            self.result, self.error = self.verb(), None
        except Exception as exc:  # the caller's to handle, in its own task
            self.result, self.error = None, exc


def _answer(calls: Sequence[_Call]) -> None:
    """On the event loop: each caller learns its verb's outcome."""
    for call in calls:
        if call.future.done():
            continue
        if call.error is not None:
            call.future.set_exception(call.error)
        else:
            call.future.set_result(call.result)


class SqliteStore:
    def __init__(self, db: SqliteDb) -> None:
        self.path = db.path
        self._db = db
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"store {db.path.name}", daemon=True)
        self._thread.start()

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (or create, or upgrade) the store at `path`, off the event loop."""
        return cls(await anyio.to_thread.run_sync(SqliteDb, path))

    @property
    def location(self) -> str:
        return str(self.path)

    async def _call(self, verb: Callable[[], T], *, durable: bool = False, repeatable: bool = True) -> T:
        """`verb` on the store's thread; its answer once the commit holding its change has
        returned (synced if `durable`). Not `repeatable`: it runs once even if its batch is
        run again (it reads on from a cursor)."""
        future = self._hand_over(verb, durable=durable, repeatable=repeatable)
        with anyio.CancelScope(shield=True):  # handed over, it is done: its caller waits for the end
            answer = await future
        return answer

    def _hand_over(self, verb: Callable[[], T], *, durable: bool, repeatable: bool) -> asyncio.Future[T]:
        if self._closed:
            raise StoreError(f"the state store {self.path} is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Call(verb, future, durable=durable, repeatable=repeatable))
        return future

    # -- the store's thread ---------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._serve_until_closed()
        finally:
            self._db.close()

    def _serve_until_closed(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            calls = [first]
            while len(calls) < BATCH_MAX_VERBS:  # whatever queued up meanwhile shares the commit
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                calls.append(more)
            self._run(calls)
            by_loop: dict[asyncio.AbstractEventLoop, list[_Call]] = {}
            for call in calls:  # one wake-up of each event loop for the whole batch
                by_loop.setdefault(call.future.get_loop(), []).append(call)
            for loop, answered in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_answer, answered)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass

    def _run(self, calls: list[_Call]) -> None:
        if len(calls) == 1:
            calls[0].run()  # its own transaction, as the verb makes it
            return
        try:
            with self._db.batch(durable=any(c.durable for c in calls)) as batch:
                for call in calls:
                    call.run()
                    if batch.broken():
                        raise StoreError(f"state store {self.path}: the batch's transaction was rolled back")
            return
        except Exception as exc:  # said in the log; every verb runs again alone
            event(log, "store.batch_failed", verbs=len(calls), reason=str(exc))
        for call in calls:  # none of the batch's changes happened: each in its own transaction
            call.run()

    @property
    def tally(self) -> tuple[int, int, int]:
        """Commits so far, how many of them synced, and the changes they held."""
        t = self._db.tally
        return t.commits, t.synced, t.changes

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # nothing is handed over after this
        self._queue.put(None)  # the thread runs what was handed over before it, then closes the file
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._thread.join)
        commits, synced, changes = self.tally
        event(log, "store.commits", commits=commits, synced=synced, changes=changes)

    async def manifest_pages(
        self, page_size: int, *, removed: bool = False
    ) -> AsyncIterator[list[tuple[JobRow, list[FileRow]]]]:
        pages = self._db.manifest_pages(page_size, removed=removed)
        try:
            while (page := await self._call(partial(next, pages, None), repeatable=False)) is not None:
                yield page
        finally:
            await self._call(pages.close)

    async def sync_manifest(
        self, campaign: str, specs: Sequence[JobSpec], fingerprints: Sequence[str], now: float
    ) -> SyncReport:
        return await self._call(partial(self._db.sync_manifest, campaign, specs, fingerprints, now))

    async def job(self, job_id: str) -> JobRow:
        return await self._call(partial(self._db.job, job_id))

    async def jobs(self, states: Iterable[JobState] | None = None) -> list[JobRow]:
        return await self._call(partial(self._db.jobs, states))

    async def counts(self) -> dict[JobState, int]:
        return await self._call(self._db.counts)

    async def count(self, states: Iterable[JobState]) -> int:
        return await self._call(partial(self._db.count, states))

    async def ids(self, states: Iterable[JobState]) -> list[str]:
        return await self._call(partial(self._db.ids, states))

    async def jobs_by_id(self, ids: Iterable[str]) -> list[JobRow]:
        return await self._call(partial(self._db.jobs_by_id, ids))

    async def due_for_check(self, now: float) -> list[JobRow]:
        return await self._call(partial(self._db.due_for_check, now))

    async def next_check_due(self, after: float) -> float | None:
        return await self._call(partial(self._db.next_check_due, after))

    async def durations(self, job_type: str, limit: int = 50) -> list[float]:
        return await self._call(partial(self._db.durations, job_type, limit))

    async def newest_submitted(self, job_type: str, limit: int) -> set[str]:
        return await self._call(partial(self._db.newest_submitted, job_type, limit))

    async def ready_to_submit(self, limit: int) -> list[tuple[JobRow, JobState | None, str | None]]:
        return await self._call(partial(self._db.ready_to_submit, limit))

    async def record_intents(
        self,
        intents: Sequence[tuple[str, str, str]],
        now: float,
        *,
        max_active: int | None = None,
        rate_per_s: float | None = None,  # paced in the process (api/budget.py): one process per campaign
        max_new_jobs: int | None = None,  # counted by the run (run/submit.py), for the same reason
    ) -> list[str]:
        return await self._call(partial(self._db.record_intents, intents, now, max_active=max_active), durable=True)

    async def mark_submitted(
        self, job_id: str, remote_id: str, now: float, *, next_check_at: float | None = None
    ) -> None:
        return await self._call(
            partial(self._db.mark_submitted, job_id, remote_id, now, next_check_at=next_check_at), durable=True
        )

    async def mark_submitted_many(self, items: Sequence[tuple[str, str, float | None]], now: float) -> list[str]:
        return await self._call(partial(self._db.mark_submitted_many, items, now), durable=True)

    async def move(
        self, job_id: str, state: JobState, now: float, *, reason: str | None = None, job_json: str | None = None
    ) -> None:
        return await self._call(partial(self._db.move, job_id, state, now, reason=reason, job_json=job_json))

    async def job_objects(self, job_ids: Sequence[str]) -> dict[str, str]:
        return await self._call(partial(self._db.job_objects, job_ids))

    async def record_attempt(self, job_id: str, now: float, window_end: float, *, need_s: float = 0.0) -> bool:
        return await self._call(partial(self._db.record_attempt, job_id, now, window_end))

    # -- several workers: one process owns a SQLite campaign (CampaignLock), so it holds every job

    @property
    def shared(self) -> bool:
        return False

    async def held(self, states: Iterable[JobState]) -> list[JobRow]:
        return await self.jobs(states)

    async def claim_work(
        self, *, window_end: float, downloads: int, checks: int, checking: Collection[str] = ()
    ) -> Claims:
        return Claims()

    async def new_jobs_in_round(self) -> int:
        return 0

    async def waiting_elsewhere(self, states: Iterable[JobState]) -> int:
        return 0

    def part_suffix(self, job_id: str) -> str:
        return ".part"

    async def workers(self) -> list[WorkerRow]:
        return []

    async def answer_lost(self, job_id: str, window_end: float) -> None:
        return await self._call(partial(self._db.answer_lost, job_id, window_end))

    async def adoption_candidates(self) -> list[JobRow]:
        return await self._call(self._db.adoption_candidates)

    async def adopt(self, found: Sequence[tuple[str, str, float | None]], checked: Sequence[str], now: float) -> None:
        return await self._call(partial(self._db.adopt, found, checked, now), durable=True)

    async def record_duplicates(self, job_id: str, remote_ids: Sequence[str]) -> bool:
        return await self._call(partial(self._db.record_duplicates, job_id, remote_ids), durable=True)

    async def duplicates(self) -> dict[str, tuple[str, ...]]:
        return await self._call(self._db.duplicates)

    async def update_remote(
        self,
        job_id: str,
        *,
        remote_state: str,
        percentage: float | None,
        next_check_at: float | None,
        now: float,
    ) -> None:
        return await self._call(
            partial(
                self._db.update_remote,
                job_id,
                remote_state=remote_state,
                percentage=percentage,
                next_check_at=next_check_at,
                now=now,
            )
        )

    async def check_at(self, job_id: str, when: float) -> None:
        return await self._call(partial(self._db.check_at, job_id, when))

    async def files(self, job_id: str) -> list[FileRow]:
        return await self._call(partial(self._db.files, job_id))

    async def files_by_job(self) -> dict[str, list[FileRow]]:
        return await self._call(self._db.files_by_job)

    async def all_files(self) -> list[FileRow]:
        return await self._call(self._db.all_files)

    async def files_done_total(self) -> tuple[int, int]:
        return await self._call(self._db.files_done_total)

    async def file_done(self, job_id: str, remote_id: str, sha256: str, size: int) -> None:
        return await self._call(partial(self._db.file_done, job_id, remote_id, sha256, size), durable=True)

    async def file_lost(self, job_id: str, remote_id: str) -> None:
        return await self._call(partial(self._db.file_lost, job_id, remote_id))

    async def file_missing(self, job_id: str, remote_id: str) -> None:
        return await self._call(partial(self._db.file_missing, job_id, remote_id))

    async def record_success(
        self, job_id: str, *, checkpoint_id: str | None, files: Sequence[FileRow], remote_state: str, now: float
    ) -> None:
        return await self._call(
            partial(
                self._db.record_success,
                job_id,
                checkpoint_id=checkpoint_id,
                files=files,
                remote_state=remote_state,
                now=now,
            )
        )

    async def part_record(self, job_id: str, remote_id: str) -> PartRecord | None:
        return await self._call(partial(self._db.part_record, job_id, remote_id))

    async def part_start_over(self, job_id: str, remote_id: str, size: int | None) -> None:
        return await self._call(partial(self._db.part_start_over, job_id, remote_id, size))

    async def part_set_etag(self, job_id: str, remote_id: str, etag: str | None) -> None:
        return await self._call(partial(self._db.part_set_etag, job_id, remote_id, etag))

    async def part_prove(self, job_id: str, remote_id: str, start: int, length: int) -> None:
        return await self._call(partial(self._db.part_prove, job_id, remote_id, start, length))

    async def part_keep_only(self, job_id: str, remote_id: str, spans: Sequence[tuple[int, int]]) -> None:
        return await self._call(partial(self._db.part_keep_only, job_id, remote_id, spans))

    async def upload_record(self, job_id: str, remote_id: str) -> UploadRecord | None:
        return await self._call(partial(self._db.upload_record, job_id, remote_id))

    async def upload_started(
        self,
        job_id: str,
        remote_id: str,
        *,
        upload_id: str,
        key: str,
        part_bytes: int,
        size: int,
        source_etag: str | None,
    ) -> None:
        return await self._call(
            partial(
                self._db.upload_started,
                job_id,
                remote_id,
                upload_id=upload_id,
                key=key,
                part_bytes=part_bytes,
                size=size,
                source_etag=source_etag,
            ),
            durable=True,
        )

    async def upload_part_done(self, job_id: str, remote_id: str, part: UploadedPart) -> None:
        return await self._call(partial(self._db.upload_part_done, job_id, remote_id, part), durable=True)

    async def upload_forget(self, job_id: str, remote_id: str) -> None:
        return await self._call(partial(self._db.upload_forget, job_id, remote_id))

    async def settle(
        self, job_id: str, state: JobState, now: float, *, remote_id: str | None, reason: str
    ) -> tuple[str, ...]:
        return await self._call(
            partial(self._db.settle, job_id, state, now, remote_id=remote_id, reason=reason), durable=True
        )

    async def check_writable(self) -> None:
        return await self._call(self._db.check_writable, durable=True)
