"""Settings of the simulator: the service's behaviour, its time scale and its faults.

Every duration here is in *service* seconds (what the real API would take); the
simulator divides them by ``time_scale``, so a 20-minute training with
``time_scale=600`` takes 2 real seconds and a 1 h image URL lives 6 real seconds.
Timestamps and ``X-Goog-Expires`` are reported in real seconds, so a client's
clock and the simulator's agree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_TEST_KEY = "dl-" + "5e" * 16  # shaped like a real key: dl- + 32 hex
DEFAULT_ADMIN_TOKEN = "sim-admin"

QUEUE_S = 10.0
DREAMBOOTH_BASE_S = 30.0
DREAMBOOTH_S_PER_STEP = 0.8  # the docs' example: 100 steps ran 89 s
IMAGE_BASE_S = 15.0
IMAGE_S_PER_SAMPLE = 3.0
DURATION_JITTER = 0.2  # +-20 %
CHECKPOINT_URL_TTL_S = 172_800.0  # 48 h (doc)
IMAGE_URL_TTL_S = 3_600.0  # 1 h (seen in a client)
RETENTION_S = 172_800.0  # checkpoints deleted 48 h after training (doc)
CHECKPOINT_BYTES = 2_132_625_438  # the docs' example, SD 1.5
SDXL_CHECKPOINT_BYTES = 6_938_040_682
LORA_BYTES = 75_611_048  # the docs' example
IMAGE_MAX_PX = 512
# Objects up to this size are uploaded whole (x-goog-hash gives md5 and crc32c); larger ones are
# composite, as large uploads often are on GCS (crc32c only).
HASH_MAX_BYTES = 64 * 1024 * 1024
SLOW_ANSWER_S = 30.0  # real seconds: longer than any sane client timeout
LATE_CREATE_S = 90.0  # real seconds: a late_create submission is answered, and its job made, this late
LIST_DEFAULT_LIMIT = 50
CALLBACK_ATTEMPTS = 4
CALLBACK_BACKOFF_S = 0.5  # real seconds, doubled per attempt


class FaultKind(enum.StrEnum):
    """What a scripted fault does to the request it hits."""

    SERVER_ERROR = "5xx"  # 500/502/503 before anything happens (storage: 503)
    RATE_LIMITED = "429"  # with a Retry-After header: 1 s, or `arg` seconds when scripted
    RATE_LIMITED_BARE = "429-bare"  # without Retry-After
    SLOW = "slow"  # answer after SLOW_ANSWER_S (submit: the job is created first)
    GHOST = "ghost"  # submit: create the job, then drop the connection
    GHOST_5XX = "ghost-5xx"  # submit: create the job, then answer 502
    LATE_CREATE = "late-create"  # submit: wait `late_s`, then create the job (even if the client left) and answer
    RESET = "reset"  # download: drop the connection after `arg` bytes
    TRUNCATE = "truncate"  # download: end the body early after `arg` bytes
    IGNORE_RANGE = "ignore-range"  # download: answer 200 with the whole file
    FAIL_JOB = "fail-job"  # submit: the job will end in failure
    REWRITE = "rewrite"  # download: the object is replaced (new generation, ETag and bytes; `arg` bytes longer) first
    CORRUPT_HEADER = "corrupt-header"  # download: replaced first by one whose safetensors header is broken
    GARBLE = "garble"  # download: right length and headers, wrong bytes from `arg` on (default: half the body)


class Route(enum.StrEnum):
    """Request classes that faults and counters refer to."""

    SUBMIT = "submit"
    GET = "get"
    LIST = "list"
    DOWNLOAD = "download"
    ANY_API = "api"  # submit, get or list


@dataclass(frozen=True, kw_only=True)
class ScriptedFault:
    """Hit the `nth` (1-based) request of `route`, and the `count - 1` after it."""

    route: Route
    kind: FaultKind
    nth: int = 1
    count: int = 1
    # bytes before a reset/truncate/garble (default: half the body); a rewrite's growth; a 429's Retry-After
    arg: int | None = None


@dataclass(frozen=True, kw_only=True)
class FaultRates:
    """Probability per request of each fault; drawn from the simulator's seed."""

    server_error: float = 0.0
    rate_limited: float = 0.0
    retry_after_share: float = 0.5  # of the 429s, how many carry Retry-After
    slow: float = 0.0
    ghost_submit: float = 0.0
    ghost_5xx: float = 0.0
    late_create: float = 0.0
    reset_download: float = 0.0
    truncate_download: float = 0.0
    ignore_range: float = 0.0
    rewrite: float = 0.0
    job_failure: float = 0.0


@dataclass(frozen=True, kw_only=True)
class FaultPlan:
    rates: FaultRates = field(default_factory=FaultRates)
    script: tuple[ScriptedFault, ...] = ()
    requests_per_s: float | None = None  # per API key; over it: 429 with Retry-After
    slow_s: float = SLOW_ANSWER_S
    late_s: float = LATE_CREATE_S  # real seconds before a late_create submission makes its job


@dataclass(frozen=True, kw_only=True)
class SimSettings:
    api_keys: tuple[str, ...] = (DEFAULT_TEST_KEY,)
    admin_token: str = DEFAULT_ADMIN_TOKEN
    seed: int = 0
    time_scale: float = 1.0
    queue_s: float = QUEUE_S
    dreambooth_base_s: float = DREAMBOOTH_BASE_S
    dreambooth_s_per_step: float = DREAMBOOTH_S_PER_STEP
    image_base_s: float = IMAGE_BASE_S
    image_s_per_sample: float = IMAGE_S_PER_SAMPLE
    duration_jitter: float = DURATION_JITTER
    capacity: int | None = None  # jobs running at once; more wait in the queue
    checkpoint_url_ttl_s: float = CHECKPOINT_URL_TTL_S
    image_url_ttl_s: float = IMAGE_URL_TTL_S
    retention_s: float = RETENTION_S
    checkpoint_bytes: int = CHECKPOINT_BYTES
    sdxl_checkpoint_bytes: int = SDXL_CHECKPOINT_BYTES
    lora_bytes: int = LORA_BYTES
    image_max_px: int = IMAGE_MAX_PX
    hash_max_bytes: int = HASH_MAX_BYTES  # md5 only up to this size (non-composite objects)
    crc32c: bool = True  # False: storage sends no hash at all (only size and ETag tell)
    tokens: int | None = None  # balance; None: unlimited
    # Variants of what api-notes.md calls uncertain, so clients can be tested on each.
    image_type_spelling: str = "image_gen"  # or "image-gen": the job object's job_type
    list_envelope: str | None = None  # None: a bare JSON list; "jobs": {"jobs": [...]}
    list_echoes_tags: bool = True
    hostile_names: bool = False  # result file names that try to escape a folder
    download_bytes_per_s: float | None = None  # per connection; None: as fast as it goes
    faults: FaultPlan = field(default_factory=FaultPlan)

    @classmethod
    def for_demo(cls, **overrides: object) -> SimSettings:
        """Fast and small: a 20-minute training in 2 s, checkpoints of a few MiB."""
        base: dict[str, object] = {
            "time_scale": 600.0,
            "checkpoint_bytes": 12 * 1024 * 1024 + 345,
            "sdxl_checkpoint_bytes": 24 * 1024 * 1024 + 678,
            "lora_bytes": 3 * 1024 * 1024 + 21,
            "image_max_px": 128,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]
