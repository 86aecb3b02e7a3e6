"""The `Store` protocol: what everything above the store may ask of it, in domain verbs, and
the rows it answers with."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from ..models import Artifact, ArtifactKind, JobSpec, JobState
from .parts import PartRecord

if TYPE_CHECKING:
    import sqlite3

Row: TypeAlias = "Mapping[str, Any] | sqlite3.Row"


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRow:
    id: str
    type: str
    state: JobState
    fingerprint: str  # of the spec in the manifest as last synced
    sent_fingerprint: str | None  # of what was submitted
    sent_payload: str | None  # JSON of what was submitted (secrets removed)
    checkpoint_from: str | None
    remote_id: str | None
    remote_state: str | None
    percentage: float | None
    checkpoint_id: str | None  # the trained checkpoint, for dependents
    intent_at: float | None
    submitted_at: float | None
    finished_at: float | None
    ended_at: float | None  # when we learned the API ended it
    updated_at: float
    next_check_at: float | None
    checks: int
    reason: str | None
    in_manifest: bool
    # schema 2, never paying twice
    attempt_at: float | None = None  # the last POST was sent then
    reconcile_at: float | None = None  # its grace window ends then (if its answer is lost)
    adoption_checked: bool = False  # the job list was read for its tag before a first submission
    duplicate_ids: tuple[str, ...] = ()  # other remote jobs with its tag (never silent)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRow:
    job_id: str
    remote_id: str
    name: str
    kind: ArtifactKind
    size_bytes: int | None
    sha256: str | None
    done: bool
    lost: bool

    @classmethod
    def wanted(cls, job_id: str, artifact: Artifact) -> FileRow:
        """A file of a job's result, still to fetch."""
        return cls(
            job_id=job_id,
            remote_id=artifact.remote_id,
            name=artifact.name,
            kind=artifact.kind,
            size_bytes=artifact.size_bytes,
            sha256=None,
            done=False,
            lost=False,
        )


# The columns of a JobRow, in every backend's `jobs` table.
JOB_COLUMNS = (
    "id, type, state, fingerprint, sent_fingerprint, sent_payload, checkpoint_from, remote_id, "
    "remote_state, percentage, checkpoint_id, intent_at, submitted_at, finished_at, ended_at, updated_at, "
    "next_check_at, checks, reason, in_manifest, attempt_at, reconcile_at, adoption_checked, duplicate_ids"
)
FILE_COLUMNS = "job_id, remote_id, name, kind, size_bytes, sha256, done, lost"


def job_row(row: Row) -> JobRow:
    """A JobRow from a row of JOB_COLUMNS (SQLite's integers or PostgreSQL's booleans)."""
    values = dict(row)
    values["state"] = JobState(values["state"])
    values["in_manifest"] = bool(values["in_manifest"])
    values["adoption_checked"] = bool(values["adoption_checked"])
    values["duplicate_ids"] = tuple(json.loads(values["duplicate_ids"])) if values["duplicate_ids"] else ()
    return JobRow(**values)


def file_row(row: Row) -> FileRow:
    values = dict(row)
    values["kind"] = ArtifactKind(values["kind"])
    values["done"], values["lost"] = bool(values["done"]), bool(values["lost"])
    return FileRow(**values)


# Multipart uploads into a bucket (schema 3; PostgreSQL schema 4), recorded so that a run
# killed mid-upload, on this host or another, resumes the upload instead of starting over.
MAX_PART_NUMBER = 10_000  # S3's part numbers run from 1 to 10,000
HASH_STATE_MAX = 256  # bytes of a saved digest state: the column stays small


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadedPart:
    """A part the bucket has acknowledged."""

    number: int  # 1-based S3 part number
    etag: str  # the ETag the bucket returned for the part (completing the upload names it)
    length: int  # bytes in the part
    hash_state: bytes  # opaque: the file's running digest state after this part

    def __post_init__(self) -> None:
        if not 1 <= self.number <= MAX_PART_NUMBER:
            raise ValueError(f"part number {self.number} is not within 1..{MAX_PART_NUMBER}")
        if self.length < 0:
            raise ValueError(f"part {self.number} has a negative length ({self.length})")
        if len(self.hash_state) > HASH_STATE_MAX:
            raise ValueError(
                f"part {self.number}: a digest state of {len(self.hash_state)} bytes (at most {HASH_STATE_MAX})"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadRecord:
    """A multipart upload of one file under way, and the parts it has finished."""

    upload_id: str
    key: str  # the object key the upload completes to
    part_bytes: int  # the size of every part but the last
    size: int  # the whole file's size
    source_etag: str | None  # the ETag of the object being downloaded (the service's storage)
    parts: Mapping[int, UploadedPart]  # by number


@dataclass(frozen=True, slots=True)
class SyncReport:
    added: tuple[str, ...]
    changed_after_submit: tuple[str, ...]  # reported, never resubmitted
    removed: tuple[str, ...]  # in the store, no longer in the manifest


@dataclass(frozen=True, slots=True)
class Claims:
    """What a worker's periodic claim changed: jobs it holds now and did not before (`taken`:
    those of them another worker held), and jobs it held that it no longer does."""

    gained: tuple[str, ...] = ()
    taken: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()
    workers: int = 1  # of the campaign, renewing now (this one included)
    reads_lists: bool = True  # this worker checks the jobs at the service (one worker at a time)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRow:
    """A process working on a shared campaign, as `status` shows it."""

    id: str
    host: str
    pid: int
    started_at: float
    seen_s_ago: float  # since its last heartbeat (the database's clock)
    stopped: bool
    submitting: int
    checking: int
    downloading: int
    reads_lists: bool  # the worker that reads the job lists and checks the jobs at the service


class Store(Protocol):
    """Every verb is awaitable: a store on the network (PostgreSQL) is async, and SQLite's
    synced commits run off the event loop. One store serves one campaign."""

    @property
    def location(self) -> str: ...  # where it lives, for messages: a path or a URL without secrets

    async def sync_manifest(
        self, campaign: str, specs: Sequence[JobSpec], fingerprints: Sequence[str], now: float
    ) -> SyncReport: ...
    async def job(self, job_id: str) -> JobRow: ...
    async def jobs(self, states: Iterable[JobState] | None = None) -> list[JobRow]: ...
    async def counts(self) -> dict[JobState, int]: ...
    async def count(self, states: Iterable[JobState]) -> int: ...
    async def ids(self, states: Iterable[JobState]) -> list[str]: ...
    async def jobs_by_id(self, ids: Iterable[str]) -> list[JobRow]: ...
    async def due_for_check(self, now: float) -> list[JobRow]: ...
    async def next_check_due(self, after: float) -> float | None: ...
    async def durations(self, job_type: str, limit: int = 50) -> list[float]: ...
    async def newest_submitted(self, job_type: str, limit: int) -> set[str]: ...
    async def ready_to_submit(self, limit: int) -> list[tuple[JobRow, JobState | None, str | None]]: ...
    async def record_intents(
        self,
        intents: Sequence[tuple[str, str, str]],
        now: float,
        *,
        max_active: int | None = None,
        rate_per_s: float | None = None,
        max_new_jobs: int | None = None,
    ) -> list[str]: ...  # the ids recorded, in order: only those may be sent
    async def mark_submitted(
        self, job_id: str, remote_id: str, now: float, *, next_check_at: float | None = None
    ) -> None: ...
    async def mark_submitted_many(
        self, items: Sequence[tuple[str, str, float | None]], now: float
    ) -> list[str]: ...  # the ids another worker holds now: not recorded
    async def move(
        self, job_id: str, state: JobState, now: float, *, reason: str | None = None, job_json: str | None = None
    ) -> None: ...  # job_json: the text of the job's job.json, kept to write it again (output.py)
    async def job_objects(self, job_ids: Sequence[str]) -> dict[str, str]: ...  # job id -> its kept job.json
    # never paying twice (schema 2)
    async def record_attempt(
        self, job_id: str, now: float, window_end: float, *, need_s: float = 0.0
    ) -> bool: ...  # False: send nothing (the job is not ours to send, or not for `need_s` more)
    async def answer_lost(self, job_id: str, window_end: float) -> None: ...
    async def adoption_candidates(self) -> list[JobRow]: ...
    async def adopt(
        self, found: Sequence[tuple[str, str, float | None]], checked: Sequence[str], now: float
    ) -> None: ...
    async def record_duplicates(self, job_id: str, remote_ids: Sequence[str]) -> bool: ...
    async def duplicates(self) -> dict[str, tuple[str, ...]]: ...
    async def update_remote(
        self,
        job_id: str,
        *,
        remote_state: str,
        percentage: float | None,
        next_check_at: float | None,
        now: float,
    ) -> None: ...
    async def check_at(self, job_id: str, when: float) -> None: ...
    async def files(self, job_id: str) -> list[FileRow]: ...
    async def files_by_job(self) -> dict[str, list[FileRow]]: ...
    async def all_files(self) -> list[FileRow]: ...
    # the end of a run and `status --json`: tallies and pages, never the whole campaign at once
    async def files_done_total(self) -> tuple[int, int]: ...
    def manifest_pages(
        self, page_size: int, *, removed: bool = False
    ) -> AsyncIterator[list[tuple[JobRow, list[FileRow]]]]: ...  # removed: the jobs no longer in the manifest
    async def file_done(self, job_id: str, remote_id: str, sha256: str, size: int) -> None: ...
    async def file_lost(self, job_id: str, remote_id: str) -> None: ...
    async def file_missing(self, job_id: str, remote_id: str) -> None: ...
    async def record_success(
        self, job_id: str, *, checkpoint_id: str | None, files: Sequence[FileRow], remote_state: str, now: float
    ) -> None: ...
    # partial downloads: the object and the byte spans proven on disk (store/parts.py)
    async def part_record(self, job_id: str, remote_id: str) -> PartRecord | None: ...
    async def part_start_over(self, job_id: str, remote_id: str, size: int | None) -> None: ...
    async def part_set_etag(self, job_id: str, remote_id: str, etag: str | None) -> None: ...
    async def part_prove(self, job_id: str, remote_id: str, start: int, length: int) -> None: ...
    async def part_keep_only(self, job_id: str, remote_id: str, spans: Sequence[tuple[int, int]]) -> None: ...
    async def settle(
        self, job_id: str, state: JobState, now: float, *, remote_id: str | None, reason: str
    ) -> tuple[str, ...]: ...
    # multipart uploads into a bucket, by file: the upload (its id, key and sizes) and its
    # finished parts. A worker's writes are fenced like the partial downloads'; a takeover keeps
    # them (the upload lives in the shared bucket: the new holder resumes it).
    async def upload_record(self, job_id: str, remote_id: str) -> UploadRecord | None: ...
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
    ) -> None: ...  # replaces any earlier record of the file, and its parts; synced
    async def upload_part_done(
        self, job_id: str, remote_id: str, part: UploadedPart
    ) -> None: ...  # synced; replaces a part of its number; ignored if no upload is recorded
    async def upload_forget(self, job_id: str, remote_id: str) -> None: ...  # the record and its parts
    async def check_writable(self) -> None: ...
    # several workers (store/pg_lease.py): who works on which job; one process holds them all otherwise
    @property
    def shared(self) -> bool: ...  # True: other workers share the campaign (claim_work must run)
    async def held(self, states: Iterable[JobState]) -> list[JobRow]: ...  # the jobs this worker holds
    async def claim_work(
        self, *, window_end: float, downloads: int, checks: int, checking: Collection[str] = ()
    ) -> Claims: ...
    # New jobs recorded by the runs of a shared campaign that overlap (`--max-new-jobs` holds for
    # them together); 0 where one process owns the campaign: its run counts its own.
    async def new_jobs_in_round(self) -> int: ...
    async def waiting_elsewhere(self, states: Iterable[JobState]) -> int: ...  # jobs this worker does not hold
    def part_suffix(self, job_id: str) -> str: ...  # a partial file's suffix: of this worker's lease
    async def workers(self) -> list[WorkerRow]: ...
    async def close(self) -> None: ...
