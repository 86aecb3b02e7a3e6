"""The one exception tree of dreamlook-batch. Third-party errors are translated at the
boundary (`api/client.py`, `transfer/`, `store/`) with ``raise ... from``.

    DreamlookBatchError
    ├── ManifestError          bad manifest: every problem, with file, line and job (exit 2)
    ├── UsageError             bad command line or settings (exit 2)
    │   └── PreflightFailed    a check before the first paid POST failed: nothing was sent (exit 2)
    ├── StoreError             the state store cannot be read or written
    │   ├── LeaseLost          another worker has taken this job over (several hosts): drop it
    │   └── StoreConflict      workers' transactions locked each other out: nothing written, try again
    ├── NoSuchJob              a job named on the command line is not in the campaign, or not at the API (exit 1)
    ├── OutputError            job.json, SHA256SUMS or summary.json cannot be written (e.g. a full disk)
    │   ├── CampaignLocked     another process holds this campaign (exit 4)
    │   └── BucketError        the `--out` bucket refused or did not answer (credentials, no such bucket)
    ├── ApiError               the API answered with an error status
    │   ├── AuthError          401: stop everything (exit 3)
    │   ├── QuotaError         403: no new submissions; finish what is paid for (exit 3)
    │   ├── InvalidJob         422: this job will never be accepted as it is
    │   ├── NotFound           404
    │   ├── RateLimited        429: everyone waits `retry_after_s`
    │   └── ServerError        5xx: try again (idempotent calls only)
    ├── TransportError         no answer: connection refused, reset, timeout
    │   └── NotSent            the request provably never left (connect failed, invalid URL)
    │       └── Throttled      our own request budget did not let it go within its deadline
    └── DownloadError          a result file could not be fetched
        ├── UrlExpired         its signed URL expired or was refused: renew and resume
        ├── RangesIgnored      storage answered a range request with the whole file: one stream instead
        ├── ObjectChanged      the stored object changed (ETag or size) under a partial file: start over
        ├── FileGone           storage no longer has it (retention passed): the job is lost
        ├── KeyTaken           another object already stands at the file's key in the bucket: left alone
        ├── NoSpace            the disk filled up: the part is kept, to resume once there is room
        │   └── SpaceRefused   refused before a byte was fetched: the disk cannot hold it with its margin
        └── VerificationFailed the bytes do not match size, hash or format
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DreamlookBatchError(Exception):
    """Root of every error this package raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a manifest, where it is, and what to do."""

    file: str
    line: int | None
    job_id: str | None
    message: str
    warning: bool = False

    def __str__(self) -> str:
        place = self.file + (f":{self.line}" if self.line else "")
        job = f" job {self.job_id!r}:" if self.job_id else ""
        return f"{place}:{job} {'warning: ' if self.warning else ''}{self.message}"


class ManifestError(DreamlookBatchError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if not p.warning]
        super().__init__(f"{len(errors)} problem(s) in the manifest:\n" + "\n".join(map(str, errors)))


class UsageError(DreamlookBatchError):
    pass


class PreflightFailed(UsageError):
    pass


class StoreError(DreamlookBatchError):
    pass


class NoSuchJob(DreamlookBatchError):
    pass


class OutputError(DreamlookBatchError):
    pass


class BucketError(OutputError):
    pass


class CampaignLocked(StoreError):
    def __init__(self, lock_path: str, holder: str) -> None:
        self.lock_path, self.holder = lock_path, holder
        super().__init__(
            f"another dreamlook-batch process holds this campaign ({holder}); lock file {lock_path}. "
            "Wait for it to finish, or stop it first."
        )


class LeaseLost(StoreError):
    """This worker's lease on a job moved on (it expired and another worker claimed it): every
    write it would still make is refused, and the job is left to the one that holds it now."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} is held by another worker now (this worker's lease on it ran out)")


class StoreConflict(StoreError):
    """The database aborted a transaction that conflicted with another worker's (a deadlock,
    a serialization failure): nothing of it was written, and it may simply go again."""


class ApiError(DreamlookBatchError):
    def __init__(self, status: int, detail: Any, what: str) -> None:
        self.status, self.detail, self.what = status, detail, what
        super().__init__(f"{what}: HTTP {status}: {describe_detail(detail)}")


class AuthError(ApiError):
    pass


class QuotaError(ApiError):
    pass


class InvalidJob(ApiError):
    pass


class NotFound(ApiError):
    pass


class RateLimited(ApiError):
    def __init__(self, status: int, detail: Any, what: str, retry_after_s: float | None) -> None:
        super().__init__(status, detail, what)
        self.retry_after_s = retry_after_s


class ServerError(ApiError):
    pass


class TransportError(DreamlookBatchError):
    pass


class NotSent(TransportError):
    pass


class Throttled(NotSent):
    pass


class DownloadError(DreamlookBatchError):
    pass


class UrlExpired(DownloadError):
    pass


class RangesIgnored(DownloadError):
    pass


class ObjectChanged(DownloadError):
    pass


class FileGone(DownloadError):
    pass


class KeyTaken(DownloadError):
    pass


class VerificationFailed(DownloadError):
    pass


class NoSpace(DownloadError):
    pass


class SpaceRefused(NoSpace):
    pass


def describe_detail(detail: Any) -> str:
    """FastAPI's `detail` (a string, or a list of {loc, msg}) as one readable line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def first_error(error: BaseException) -> BaseException:
    """The error to report from what a task group raised: ours first, else the first."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    ours, _ = error.split(DreamlookBatchError)
    chosen: BaseException = ours if ours is not None else error
    while isinstance(chosen, BaseExceptionGroup):
        chosen = chosen.exceptions[0]
    return chosen
