"""Settings as frozen keyword-only dataclasses; every default is a named constant with its unit."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DEFAULT_API_URL = "https://api.dreamlook.ai"

MAX_ACTIVE = 20  # jobs submitted and not finished
SUBMIT_RATE_PER_S = 2.0
MAX_DOWNLOADS = 4
API_REQUESTS_PER_S = 10.0  # one budget for every API call

CONNECT_TIMEOUT_S = 10.0
API_READ_TIMEOUT_S = 60.0  # one API answer
LEASE_MIN_S = 60.0  # a worker of a shared campaign holds a job this long at least without renewing
POST_LEASE_MARGIN_S = 5.0  # a POST goes out only with its whole timeout and this much more of lease left
DOWNLOAD_READ_TIMEOUT_S = 60.0  # between two chunks of a file; there is no total timeout

RETRY_ATTEMPTS = 6
RETRY_TOTAL_S = 300.0
RETRY_BACKOFF_MIN_S = 0.5
RETRY_BACKOFF_MAX_S = 30.0
RETRY_AFTER_CAP_S = 300.0  # the longest pause a `Retry-After` may impose; asked for more, we log it and use this
BUDGET_WAIT_S = 600.0  # the deadline of one wait for the request budget; past it the request is not sent

# Before the first paid POST: is the API there and does it take the key? A few quick tries.
PREFLIGHT_ATTEMPTS = 4
PREFLIGHT_TOTAL_S = 30.0  # no new attempt after this
PREFLIGHT_BACKOFF_MIN_S = 0.5
PREFLIGHT_BACKOFF_MAX_S = 8.0
PREFLIGHT_DEADLINE_S = 60.0  # the whole check, however the server stalls: then exit 2

POLL_QUEUED_S = 60.0  # training: first look at a queued job; then backoff
POLL_MIN_S = 10.0
POLL_MAX_S = 300.0
IMAGE_POLL_QUEUED_S = 10.0  # image jobs take seconds to minutes, and their URLs live 1 h
IMAGE_POLL_MIN_S = 3.0
IMAGE_POLL_MAX_S = 60.0
POLL_BACKOFF = 1.5
POLL_JITTER = 0.1
CALLBACK_POLL_RELAX = 4.0  # with callbacks arriving, polls are only a safety net

URL_RENEW_MARGIN_S = 120.0  # renew a signed URL that dies within this margin
RETENTION_S = 172_800.0  # the service deletes checkpoints 48 h after training (doc)
PARALLEL_MIN_BYTES = 64 * 1024 * 1024  # files this large go over several connections
RANGE_BYTES = 16 * 1024 * 1024
CONNECTIONS_PER_FILE = 4
DOWNLOAD_ROUNDS = 3  # times a file that keeps failing is queued again in one run
DOWNLOAD_REQUEUE_S = 30.0  # wait before queuing it again
# One file's attempts within a round, and one range's within a file attempt: a range is
# tried at most DOWNLOAD_ROUNDS x FILE_ATTEMPTS x RANGE_ATTEMPTS times in one run (api/retry.py).
FILE_ATTEMPTS = 5
FILE_TOTAL_S = 1800.0  # no new attempt of one file after this
FILE_BACKOFF_MIN_S = 0.5
FILE_BACKOFF_MAX_S = 15.0
RANGE_ATTEMPTS = 5
RANGE_TOTAL_S = 600.0
RANGE_BACKOFF_MIN_S = 0.25
RANGE_BACKOFF_MAX_S = 4.0
STOP_GRACE_S = 20.0  # after Ctrl-C: how long in-flight calls may finish
# A lost answer is checked in the job list only this long after the client gave up
# (None: one more API timeout): the service may still be creating the job.
RECONCILE_GRACE_S: float | None = None


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_active: int = MAX_ACTIVE
    submit_rate_per_s: float = SUBMIT_RATE_PER_S
    max_downloads: int = MAX_DOWNLOADS
    api_requests_per_s: float = API_REQUESTS_PER_S
    max_new_jobs: int | None = None  # per run: a spending guard


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    attempts: int = RETRY_ATTEMPTS
    total_s: float = RETRY_TOTAL_S
    backoff_min_s: float = RETRY_BACKOFF_MIN_S
    backoff_max_s: float = RETRY_BACKOFF_MAX_S
    retry_after_cap_s: float = RETRY_AFTER_CAP_S

    def scaled(self, factor: float) -> RetryPolicy:
        return replace(self, backoff_min_s=self.backoff_min_s / factor, backoff_max_s=self.backoff_max_s / factor)


PREFLIGHT_RETRY = RetryPolicy(
    attempts=PREFLIGHT_ATTEMPTS,
    total_s=PREFLIGHT_TOTAL_S,
    backoff_min_s=PREFLIGHT_BACKOFF_MIN_S,
    backoff_max_s=PREFLIGHT_BACKOFF_MAX_S,
)


@dataclass(frozen=True, kw_only=True)
class PollPolicy:
    queued_s: float = POLL_QUEUED_S  # first look at a queued job; then backoff
    min_s: float = POLL_MIN_S
    max_s: float = POLL_MAX_S
    backoff: float = POLL_BACKOFF
    jitter: float = POLL_JITTER
    use_estimates: bool = True  # False: plain backoff (with backoff=1: a fixed interval)

    @classmethod
    def fixed(cls, interval_s: float) -> PollPolicy:
        """Every `interval_s`, whatever happens: what most scripts do."""
        return cls(
            queued_s=interval_s, min_s=interval_s, max_s=interval_s, backoff=1.0, jitter=0.0, use_estimates=False
        )

    def scaled(self, factor: float) -> PollPolicy:
        return replace(self, queued_s=self.queued_s / factor, min_s=self.min_s / factor, max_s=self.max_s / factor)


FILE_RETRY = RetryPolicy(
    attempts=FILE_ATTEMPTS, total_s=FILE_TOTAL_S, backoff_min_s=FILE_BACKOFF_MIN_S, backoff_max_s=FILE_BACKOFF_MAX_S
)
RANGE_RETRY = RetryPolicy(
    attempts=RANGE_ATTEMPTS, total_s=RANGE_TOTAL_S, backoff_min_s=RANGE_BACKOFF_MIN_S, backoff_max_s=RANGE_BACKOFF_MAX_S
)
# A shared state's transaction that the database aborted because workers locked each other
# out (a deadlock): nothing of it was written, so it goes again at once, a few times.
STORE_CONFLICT_RETRY = RetryPolicy(attempts=5, total_s=10.0, backoff_min_s=0.01, backoff_max_s=0.2)


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    connect_s: float = CONNECT_TIMEOUT_S
    api_read_s: float = API_READ_TIMEOUT_S
    download_read_s: float = DOWNLOAD_READ_TIMEOUT_S


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    limits: Limits = field(default_factory=Limits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    preflight_retry: RetryPolicy = PREFLIGHT_RETRY  # the API check before the first paid POST
    preflight_deadline_s: float = PREFLIGHT_DEADLINE_S
    budget_wait_s: float = BUDGET_WAIT_S
    poll: PollPolicy = field(default_factory=PollPolicy)  # training jobs
    image_poll: PollPolicy = field(
        default_factory=lambda: PollPolicy(queued_s=IMAGE_POLL_QUEUED_S, min_s=IMAGE_POLL_MIN_S, max_s=IMAGE_POLL_MAX_S)
    )
    callback_poll_relax: float = CALLBACK_POLL_RELAX
    batch_status: bool = True  # read many jobs' states from one page of the job list
    timeouts: Timeouts = field(default_factory=Timeouts)
    url_renew_margin_s: float = URL_RENEW_MARGIN_S
    retention_s: float = RETENTION_S
    file_retry: RetryPolicy = FILE_RETRY  # one file within a download round
    range_retry: RetryPolicy = RANGE_RETRY  # one range within a file attempt
    parallel_min_bytes: int = PARALLEL_MIN_BYTES
    range_bytes: int = RANGE_BYTES
    connections_per_file: int = CONNECTIONS_PER_FILE
    download_rounds: int = DOWNLOAD_ROUNDS
    download_requeue_s: float = DOWNLOAD_REQUEUE_S
    stop_grace_s: float = STOP_GRACE_S
    s3_endpoint_url: str | None = None  # `--out s3://`: None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS
    reconcile_grace_s: float | None = RECONCILE_GRACE_S
    dry_run: bool = False
    listen: str | None = None  # HOST:PORT of the callback receiver; None: no callbacks
    callback_url: str | None = None  # the public URL that reaches it (default: its own address)
    lease_s: float | None = None  # a shared campaign's leases (None: `worker_lease_s` picks)
    post_lease_margin_s: float = POST_LEASE_MARGIN_S

    @property
    def grace_s(self) -> float:
        """How long after giving up on an answer the job list is read for it."""
        return self.timeouts.api_read_s if self.reconcile_grace_s is None else self.reconcile_grace_s

    def reconcile_after(self, attempt_at: float) -> float:
        """The end of the grace window of a POST sent at `attempt_at`."""
        return attempt_at + self.timeouts.api_read_s + self.grace_s

    @property
    def post_needs_s(self) -> float:
        """The lease a POST needs left before it goes: its whole timeout, and a margin."""
        return self.timeouts.connect_s + self.timeouts.api_read_s + self.post_lease_margin_s

    @property
    def worker_lease_s(self) -> float:
        """How long a worker of a shared campaign holds a job without renewing it."""
        return self.lease_s if self.lease_s is not None else max(LEASE_MIN_S, 2 * self.post_needs_s)

    def time_scaled(self, factor: float) -> RunSettings:
        """Every wait divided by `factor`: for a simulator that runs `factor` times faster."""
        return replace(
            self,
            poll=self.poll.scaled(factor),
            image_poll=self.image_poll.scaled(factor),
            retry=self.retry.scaled(factor),
            preflight_retry=self.preflight_retry.scaled(factor),
            file_retry=self.file_retry.scaled(factor),
            range_retry=self.range_retry.scaled(factor),
            url_renew_margin_s=self.url_renew_margin_s / factor,
            retention_s=self.retention_s / factor,
            download_requeue_s=self.download_requeue_s / factor,
        )
