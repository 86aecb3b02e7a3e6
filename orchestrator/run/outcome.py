"""How a run stands and ended: the snapshot its watchers read, why it stopped, its exit
code, and the exit codes of every command.

Exit codes: 0 all done; 1 failed jobs, lost files or jobs paid twice; 2 bad manifest,
command line or a failed check before the first paid POST (nothing sent); 3 the API
refused the key or the quota ran out; 4 another process holds the campaign; 130
interrupted, state saved.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..models import BAD_ENDINGS, JobState
from ..transfer.progress import Transfer


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # failed jobs, lost files, jobs paid twice, or work left that a rerun resumes
    USAGE = 2  # bad manifest or command line, or a failed preflight: nothing was sent
    API = 3  # the key was refused, or the quota ran out with work left
    LOCKED = 4  # another process holds this campaign
    INTERRUPTED = 130  # Ctrl-C or SIGTERM: the state is saved


class StopReason(enum.StrEnum):
    """Why a run stopped before everything was finished."""

    AUTH = "auth"
    QUOTA = "quota"
    UNREACHABLE = "unreachable"  # a submission could not reach the API even after its retries
    INTERRUPTED = "interrupted"


@dataclass
class RunOutcome:
    counts: dict[JobState, int]
    stopped_by: StopReason | None
    problems: list[str] = field(default_factory=list)
    changed_after_submit: tuple[str, ...] = ()
    dry_run: bool = False
    once: bool = False
    duplicates: int = 0  # jobs the service holds more than once under our tag
    # jobs removed from the manifest after they reached the service, by state: still followed and
    # fetched; files of theirs still to fetch, or one left unknown (it may exist: a person settles
    # it), keep the run from 0; their other endings do not (the manifest no longer asks for them)
    removed: dict[JobState, int] = field(default_factory=dict)

    @property
    def exit_code(self) -> ExitCode:
        if self.stopped_by == StopReason.INTERRUPTED:
            return ExitCode.INTERRUPTED
        if self.stopped_by == StopReason.AUTH:
            return ExitCode.API
        if self.duplicates:
            return ExitCode.FAILED  # paid twice: never reported as a success, not even by --once
        # A dry run skips dependents by design (it makes no checkpoint): not a failure.
        bad = BAD_ENDINGS - {JobState.SKIPPED} if self.dry_run else BAD_ENDINGS
        if (
            any(self.counts.get(s) for s in bad)
            or (self.dry_run and self.problems)
            or self.removed.get(JobState.UNKNOWN)
        ):
            return ExitCode.FAILED
        unfinished = any(n for s, n in [*self.counts.items(), *self.removed.items()] if not s.terminal)
        if self.stopped_by == StopReason.QUOTA and unfinished:
            return ExitCode.API
        if self.stopped_by == StopReason.UNREACHABLE and unfinished:
            return ExitCode.FAILED  # even with --once: jobs were due and could not be sent
        if unfinished and not self.once:
            return ExitCode.FAILED  # e.g. files that kept failing: the next run resumes them
        return ExitCode.OK


PROGRESS_CAP = 99.0  # a job carried forward never shows as finished: only the API says that


@dataclass(frozen=True, kw_only=True)
class JobProgress:
    """A job at the service as its last look found it (kept in memory, for the live view)."""

    job_id: str
    type: str
    running: bool  # False: queued
    percentage: float | None  # the API's percentage_done (0 to 100), when it gave one
    pace: float | None  # percentage points a second, at the job's pace so far
    seen_at: float  # when the API said so (the engine's clock)
    ends_at: float | None  # the predicted end (run/schedule.py), None without an estimate

    def percentage_at(self, now: float) -> float | None:
        """The reading carried forward at the job's own pace, short of 100 until the API says it ended."""
        if self.percentage is None or self.pace is None:
            return self.percentage
        return min(PROGRESS_CAP, max(self.percentage, self.percentage + self.pace * (now - self.seen_at)))


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """A run as its watchers see it, published by the engine: they never read the store."""

    counts: dict[JobState, int]
    stopped_by: StopReason | None
    transfers: tuple[Transfer, ...]  # files being fetched (their byte counters move on)
    bytes_fetched: int
    jobs: tuple[JobProgress, ...] = ()  # jobs at the service, as last seen
    campaign_ends_at: float | None = None  # the predicted end of the jobs known, None without an estimate
