"""What every stage of a run shares, in one object: the store, the API, the settings,
the clock, the run's events (problems told once, why it stopped, the scheduler's
wakeup), the latest job objects, and the jobs whose POST is in flight.

Stages take a `RunContext` and nothing of the engine: no callbacks into it, no dicts
passed around. The engine builds the context, the stages, and drives them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio

from ..api import retry
from ..api.client import ApiClient
from ..api.jobs import parse_job
from ..config import PollPolicy, RunSettings
from ..errors import LeaseLost, StoreError
from ..events import event
from ..manifest.load import Manifest
from ..models import JobType, RemoteJob
from ..store import JobRow, Store
from .outcome import StopReason
from .schedule import Wakeup, next_check_in

log = logging.getLogger(__name__)

PROBLEM_LOOKUP_S = 5.0  # reading a job's state for its problem event: the store answers at once or not at all


class RunEvents:
    """What the run tells the user, and the scheduler's wakeup. Problems are told once per job
    and message: a re-check that finds the same thing again must not grow the list."""

    def __init__(self) -> None:
        self.job_of: Callable[[str], Awaitable[JobRow]] | None = None  # the store's row: a problem's state
        self.problems: list[str] = []
        self._seen: set[str] = set()
        self.stopped_by: StopReason | None = None
        self.wakeup = Wakeup()

    async def problem(self, job_id: str, message: str) -> None:
        """Told with the job's state and remote id as the store has them (after the stage's move)."""
        line = f"{job_id}: {message}"
        name = "job.problem_again" if line in self._seen else "job.problem"
        self._seen.add(line)
        if name == "job.problem":  # in the summary even if the run is being cancelled
            self.problems.append(line)
        row = None
        # Shielded and bounded: a stage cancelled while it tells a problem still tells it whole.
        with anyio.move_on_after(PROBLEM_LOOKUP_S, shield=True), contextlib.suppress(StoreError):
            row = await self.job_of(job_id) if self.job_of is not None else None
        state, remote_id = (row.state, row.remote_id) if row is not None else (None, None)
        event(log, name, job_id=job_id, state=state, reason=message, remote_id=remote_id)

    def note(self, line: str) -> None:
        """A line for the end of the run that is not one job's problem (or is told as is)."""
        self.problems.append(line)

    def stop(self, reason: StopReason, why: str | None = None) -> bool:
        """The first reason to stop wins; True when this one did (its `why` is told)."""
        if self.stopped_by is not None:
            return False
        self.stopped_by = reason
        if why is not None:
            self.problems.append(why)
        return True

    def notify(self) -> None:
        self.wakeup.notify()


class JobObjects:
    """The latest job object of each job being downloaded: its URLs are signed anew on every
    GET, and its job.json is written from it. Dropped when the job ends, so it holds the
    downloads in hand, not the campaign."""

    def __init__(self, store: Store, api: ApiClient, settings: RunSettings) -> None:
        self._store, self._api, self._settings = store, api, settings
        self._by_id: dict[str, RemoteJob] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, job_id: str) -> RemoteJob | None:
        return self._by_id.get(job_id)

    def keep(self, job_id: str, remote: RemoteJob) -> None:
        self._by_id[job_id] = remote

    def drop(self, job_id: str) -> None:
        self._by_id.pop(job_id, None)

    async def fresh(self, job_id: str) -> RemoteJob:
        """GET the job (retried), parsed, and kept."""
        row = await self._store.job(job_id)
        raw = await retry.idempotent(
            lambda: self._api.get_job(JobType(row.type), row.remote_id or ""), self._settings.retry, f"get {job_id}"
        )
        remote = parse_job(raw)
        self._by_id[job_id] = remote
        return remote


@contextmanager
def unless_taken_over(job_id: str, dropped: Callable[[], object] | None = None) -> Iterator[None]:
    """Work on a job of a shared campaign ends quietly where another worker has taken the job
    over (this worker's lease ran out): the job is that worker's now; `dropped` forgets it here."""
    try:
        yield
    except LeaseLost:
        event(log, "job.taken_over", job_id=job_id)
        if dropped is not None:
            dropped()


@dataclass(kw_only=True)
class RunContext:
    manifest: Manifest
    store: Store
    api: ApiClient
    settings: RunSettings
    now: Callable[[], float]
    events: RunEvents = field(default_factory=RunEvents)
    jobs: JobObjects
    posting: set[str] = field(default_factory=set)  # job ids whose POST is in flight in this process

    def __post_init__(self) -> None:
        self.events.job_of = self.store.job

    def poll_policy(self, job_type: str) -> PollPolicy:
        return self.settings.image_poll if job_type == JobType.IMAGE_GEN.value else self.settings.poll

    def first_check(self, job_type: str) -> float:
        """When a job just submitted is first looked at."""
        return self.now() + next_check_in(self.poll_policy(job_type), None, 0)
