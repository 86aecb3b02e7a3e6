"""The `Store` protocol: what the engine may ask of the state store, in domain verbs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..models import ArtifactKind, JobSpec, JobState


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

    @property
    def changed_since_sent(self) -> bool:
        return self.sent_fingerprint is not None and self.sent_fingerprint != self.fingerprint


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


@dataclass(frozen=True, slots=True)
class SyncReport:
    added: tuple[str, ...]
    changed_after_submit: tuple[str, ...]  # reported, never resubmitted
    removed: tuple[str, ...]  # in the store, no longer in the manifest


class Store(Protocol):
    def sync_manifest(
        self, campaign: str, specs: Sequence[JobSpec], fingerprints: Sequence[str], now: float
    ) -> SyncReport: ...
    def job(self, job_id: str) -> JobRow: ...
    def jobs(self, states: Iterable[JobState] | None = None) -> list[JobRow]: ...
    def counts(self) -> dict[JobState, int]: ...
    def ids(self, states: Iterable[JobState]) -> list[str]: ...
    def jobs_by_id(self, ids: Iterable[str]) -> list[JobRow]: ...
    def due_for_check(self, now: float) -> list[JobRow]: ...
    def next_check_due(self, after: float) -> float | None: ...
    def durations(self, job_type: str, limit: int = 50) -> list[float]: ...
    def newest_submitted(self, job_type: str, limit: int) -> set[str]: ...
    def ready_to_submit(self, limit: int) -> list[tuple[JobRow, JobState | None, str | None]]: ...
    def record_intents(self, intents: Sequence[tuple[str, str, str]], now: float) -> None: ...
    def mark_submitted(
        self, job_id: str, remote_id: str, now: float, *, next_check_at: float | None = None
    ) -> None: ...
    def move(self, job_id: str, state: JobState, now: float, *, reason: str | None = None) -> None: ...
    def update_remote(
        self,
        job_id: str,
        *,
        remote_state: str,
        percentage: float | None,
        next_check_at: float | None,
        now: float,
    ) -> None: ...
    def check_at(self, job_id: str, when: float) -> None: ...
    def set_checkpoint(self, job_id: str, checkpoint_id: str) -> None: ...
    def add_files(self, job_id: str, files: Sequence[FileRow]) -> None: ...
    def files(self, job_id: str) -> list[FileRow]: ...
    def file_done(self, job_id: str, remote_id: str, sha256: str, size: int) -> None: ...
    def file_lost(self, job_id: str, remote_id: str) -> None: ...
    def part_etag(self, job_id: str, remote_id: str) -> str | None: ...
    def set_part_etag(self, job_id: str, remote_id: str, etag: str | None) -> None: ...
    def ranges_done(self, job_id: str, remote_id: str) -> set[int]: ...
    def mark_range_done(self, job_id: str, remote_id: str, index: int) -> None: ...
    def clear_ranges(self, job_id: str, remote_id: str) -> None: ...
    def settle(self, job_id: str, state: JobState, now: float, *, remote_id: str | None, reason: str) -> None: ...
    def close(self) -> None: ...
