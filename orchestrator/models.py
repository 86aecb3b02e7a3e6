"""The data types shared by the client side: job types and states, specs, remote jobs, files."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class JobType(enum.StrEnum):
    DREAMBOOTH = "dreambooth"
    IMAGE_GEN = "image_gen"
    DREAMBOOTH_IMAGE_GEN = "dreambooth_image_gen"

    @classmethod
    def parse(cls, name: str) -> JobType | None:
        """The docs spell image jobs both `image_gen` and `image-gen`: accept both."""
        try:
            return cls(name.strip().lower().replace("-", "_"))
        except ValueError:
            return None

    @property
    def trains(self) -> bool:
        return self is not JobType.IMAGE_GEN


class JobState(enum.StrEnum):
    PENDING = "pending"  # not sent yet (maybe waiting for checkpoint_from)
    SUBMITTING = "submitting"  # intent recorded; the POST's outcome is not yet known
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # the API says success; files not yet all on disk
    DOWNLOADING = "downloading"
    DONE = "done"  # every chosen file on disk and verified
    FAILED = "failed"  # the API says failure
    INVALID = "invalid"  # 422: will not be retried
    UNKNOWN = "unknown"  # a submission whose outcome cannot be established: needs a person
    LOST = "lost"  # a result file was deleted before it could be fetched
    SKIPPED = "skipped"  # never sent: its checkpoint_from job did not succeed
    DRY_RUN_OK = "dry-run-ok"  # --dry-run: the API accepted the payload

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def in_flight(self) -> bool:
        """Submitted (or maybe submitted) and not finished: counts against --max-active."""
        return self in IN_FLIGHT


TERMINAL = frozenset(
    {
        JobState.DONE,
        JobState.FAILED,
        JobState.INVALID,
        JobState.UNKNOWN,
        JobState.LOST,
        JobState.SKIPPED,
        JobState.DRY_RUN_OK,
    }
)
# A parent in one of these states that has no checkpoint can give none: its dependents are
# SKIPPED. Whenever that stops being true (a person settles the parent, it goes back to
# pending, a checkpoint turns up), the store puts them back to PENDING at once.
PARENT_ENDED = TERMINAL | {JobState.SUCCEEDED, JobState.DOWNLOADING}
# The state sets the stages work on, named once.
AT_SERVICE = frozenset({JobState.QUEUED, JobState.RUNNING})  # sent and known to the service: checked
IN_FLIGHT = AT_SERVICE | {JobState.SUBMITTING}  # maybe sent and not finished: counts against --max-active
TO_DOWNLOAD = frozenset({JobState.SUCCEEDED, JobState.DOWNLOADING})  # files still to fetch
MAY_POST = frozenset({JobState.PENDING, JobState.SUBMITTING})  # a run may still send these
# A job in one of these never reached the service, or was refused by it (422): it cost nothing.
UNPAID = frozenset({JobState.PENDING, JobState.SKIPPED, JobState.INVALID, JobState.DRY_RUN_OK})
BAD_ENDINGS = frozenset({JobState.FAILED, JobState.INVALID, JobState.UNKNOWN, JobState.LOST, JobState.SKIPPED})


class RemoteState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    OTHER = "other"  # a value we do not know: never read as an ending


class ArtifactKind(enum.StrEnum):
    CHECKPOINT = "checkpoint"  # full model
    LORA = "lora"
    IMAGE = "image"


DOWNLOAD_CHOICES = frozenset({"checkpoint", "lora", "images", "intermediate"})


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One job of the manifest: what to send and what to do with the results."""

    id: str
    type: JobType
    payload: Mapping[str, Any]  # sent to the API as written (after defaults)
    download: frozenset[str] | None = None  # None: everything the job makes
    checkpoint_from: str | None = None
    location: Location = field(default_factory=lambda: Location("?"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Artifact:
    """One result file of a job."""

    name: str  # safe file name, unique within the job
    kind: ArtifactKind
    remote_id: str  # checkpoint_id or generated_image_id: stable across URL renewals
    url: str  # signed: never logged or stored
    size_bytes: int | None = None
    training_step: int | None = None
    available: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteJob:
    """The API's job object, read tolerantly."""

    job_id: str
    state: RemoteState
    raw_state: str
    percentage_done: float | None
    running_duration_s: float | None
    finished_at: float | None  # state_running_end as Unix time: retention counts from it
    failure_reason: str | None
    artifacts: tuple[Artifact, ...]
    final_checkpoint_id: str | None
    tags: tuple[tuple[str, str], ...]
    raw: Mapping[str, Any]


# Which states a job may move to from each state. Nothing leaves DONE, FAILED, INVALID,
# LOST or DRY_RUN_OK; UNKNOWN is left only by a person (`settle`), never by an event.
# SKIPPED is entered only while the parent is ended without a checkpoint (PARENT_ENDED)
# and left, back to PENDING, only once that is no longer so: a dependent is never stranded.
_S = JobState
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    _S.PENDING: frozenset({_S.SUBMITTING, _S.DRY_RUN_OK, _S.INVALID, _S.SKIPPED}),
    # Back to PENDING only when the job provably does not exist (never sent, or absent
    # from a listing that covers the time since the intent).
    _S.SUBMITTING: frozenset({_S.PENDING, _S.QUEUED, _S.RUNNING, _S.SUCCEEDED, _S.FAILED, _S.INVALID, _S.UNKNOWN}),
    _S.QUEUED: frozenset({_S.RUNNING, _S.SUCCEEDED, _S.FAILED}),
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED}),
    _S.SUCCEEDED: frozenset({_S.DOWNLOADING, _S.DONE, _S.LOST}),
    _S.DOWNLOADING: frozenset({_S.DONE, _S.LOST}),
    _S.UNKNOWN: frozenset(),
    _S.DONE: frozenset(),
    _S.FAILED: frozenset(),
    _S.INVALID: frozenset(),
    _S.LOST: frozenset(),
    _S.SKIPPED: frozenset({_S.PENDING}),
    _S.DRY_RUN_OK: frozenset(),
}


def can_move(source: JobState, target: JobState) -> bool:
    return source == target or target in TRANSITIONS[source]
