"""The simulated service's state, with no HTTP: jobs, life cycle, results, tokens, ledger.

A job's whole timeline (queue end, run end, failure) is fixed when it is created,
so reading its state is a pure function of the clock and costs no background task.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .content import FileContent
from .settings import SimSettings
from .validation import MODEL_TYPES, check_dreambooth, check_image_gen

BUCKET = "nyxai-standard-usc2"
FAILURE_REASONS = (
    ("training_failed", {"message": "CUDA out of memory at step {step}"}),
    ("image_download_failed", {"message": "could not fetch one of image_urls"}),
    ("nsfw_content_detected", {"message": "the safety checker flagged the output"}),
)


class JobKind(enum.StrEnum):
    DREAMBOOTH = "dreambooth"
    IMAGE_GEN = "image_gen"
    DREAMBOOTH_IMAGE_GEN = "dreambooth_image_gen"

    @classmethod
    def parse(cls, name: str) -> JobKind | None:
        """Both spellings the docs use (`image_gen`, `image-gen`) name one type."""
        try:
            return cls(name.replace("-", "_"))
        except ValueError:
            return None


PREFIX = {JobKind.DREAMBOOTH: "db_", JobKind.IMAGE_GEN: "ig_", JobKind.DREAMBOOTH_IMAGE_GEN: "dbig_"}


class Rejected(Exception):
    """A submission the service refuses: `status` and FastAPI-style `detail`."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: str
    job_id: str
    ttl_s: float  # real seconds a signed URL lives
    deleted_at: float  # real time the file is gone
    content: FileContent | None = None  # checkpoints
    png: tuple[str, int, int] | None = None  # images: key, width, height


@dataclass(slots=True)
class Checkpoint:
    checkpoint_id: str
    file: StoredFile
    is_lora: bool
    step: int
    model_type: str


@dataclass(slots=True)
class Image:
    image_id: str
    file: StoredFile
    seed: int
    generation_idx: int


@dataclass(slots=True)
class SimJob:
    job_id: str
    kind: JobKind
    config: dict[str, Any]
    tags: list[dict[str, str]]
    created: float
    queued_end: float
    run_end: float
    fail_at: float | None  # real time of failure, or None for success
    failure: tuple[str, dict[str, Any]] | None
    cost: int
    callback: str | None
    dry_run: bool
    checkpoints: list[Checkpoint] = field(default_factory=list)
    image_sets: list[tuple[str | None, list[Image]]] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.fail_at if self.fail_at is not None else self.run_end

    def state_at(self, now: float) -> str:
        if now < self.queued_end:
            return "queued"
        if now < self.end:
            return "running"
        return "failure" if self.fail_at is not None else "success"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    job_id: str
    job_type: str
    config: dict[str, Any]
    tags: list[dict[str, str]]
    created_at: float
    cost: int


@dataclass(frozen=True, slots=True)
class Served:
    """One download answered: which bytes of which file, and how it ended."""

    path: str
    start: int
    end: int  # exclusive: what was promised, not what was sent before a fault
    status: int
    fault: str | None


@dataclass
class Ledger:
    """What tests read to prove "no duplicates, nothing lost"."""

    jobs: list[LedgerEntry] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    downloads: list[Served] = field(default_factory=list)
    list_readers: list[str] = field(default_factory=list)  # the user agent of each reading of many jobs, in order

    def tag_values(self) -> Counter[str]:
        """How many ledger jobs carry each `dreamlook-batch` tag value."""
        return Counter(t["value"] for e in self.jobs for t in e.tags if t.get("key") == "dreamlook-batch")


def iso(t: float | None) -> str | None:
    """ISO 8601 without a zone, as the API writes UTC times."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


class Service:
    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.jobs: dict[str, SimJob] = {}
        self.by_kind: dict[JobKind, list[SimJob]] = {k: [] for k in JobKind}
        self.files: dict[str, StoredFile] = {}
        self.checkpoints: dict[str, tuple[SimJob, Checkpoint]] = {}
        self.tokens = settings.tokens
        self.ledger = Ledger()
        self._slots: list[float] = []  # run ends of jobs holding a capacity slot
        self.generations: Counter[str] = Counter()  # path -> rewrites (REWRITE, CORRUPT_HEADER faults)
        self.resized: Counter[str] = Counter()  # path -> bytes a rewrite added (or took away)
        self.corrupt: set[str] = set()  # paths rewritten with a broken safetensors header

    def _scaled(self, service_s: float) -> float:
        return service_s / self.settings.time_scale

    def _new_id(self, prefix: str) -> str:
        while True:
            candidate = f"{prefix}{self.rng.getrandbits(32):08x}"
            if candidate not in self.jobs and candidate not in self.checkpoints:
                return candidate

    # -- submission ---------------------------------------------------------------

    def validate(self, kind: JobKind, body: dict[str, Any], now: float) -> None:
        def checkpoint_ok(ckp_id: str) -> str | None:
            found = self.checkpoints.get(ckp_id)
            if found is None:
                return f"checkpoint {ckp_id!r} does not exist"
            job, ckp = found
            if job.state_at(now) != "success":
                return f"checkpoint {ckp_id!r} is not ready (its job is {job.state_at(now)})"
            if now >= ckp.file.deleted_at:
                return f"checkpoint {ckp_id!r} was deleted after the retention period"
            return None

        errors: list[dict[str, Any]]
        if kind is JobKind.DREAMBOOTH:
            errors = check_dreambooth(body, [])
        elif kind is JobKind.IMAGE_GEN:
            errors = check_image_gen(body, [], checkpoint_ok)
        else:
            errors = []
            training = body.get("dreambooth")
            if not isinstance(training, dict):
                errors.append({"loc": ["body", "dreambooth"], "msg": "field required", "type": "value_error.missing"})
            else:
                errors += check_dreambooth(training, ["dreambooth"])
            gens = body.get("image_gen")
            if not isinstance(gens, list) or not gens:
                errors.append(
                    {
                        "loc": ["body", "image_gen"],
                        "msg": "a non-empty list is required",
                        "type": "value_error.missing",
                    }
                )
            else:
                for i, gen in enumerate(gens):
                    if not isinstance(gen, dict):
                        errors.append(
                            {
                                "loc": ["body", "image_gen", i],
                                "msg": "value is not a valid dict",
                                "type": "type_error.dict",
                            }
                        )
                        continue
                    # The model comes from the training; base_model/checkpoint_id are not asked for.
                    gen_body = {**gen, "checkpoint_id": None, "base_model": "stable-diffusion-v1-5"}
                    errors += check_image_gen(gen_body, ["image_gen", i], checkpoint_ok)
        if errors:
            raise Rejected(422, errors)

    def cost_of(self, kind: JobKind, body: dict[str, Any]) -> int:
        def training(b: dict[str, Any]) -> int:
            sdxl = MODEL_TYPES.get(b.get("base_model", "")) == "sdxl-v1"
            return max(1, math.ceil(int(b.get("steps", 1200)) / 100)) + (4 if sdxl else 0)

        def images(b: dict[str, Any]) -> int:
            return max(1, math.ceil(int(b.get("num_samples", 1)) / 4))

        if kind is JobKind.DREAMBOOTH:
            return training(body)
        if kind is JobKind.IMAGE_GEN:
            return images(body)
        return training(body["dreambooth"]) + sum(images(g) for g in body["image_gen"])

    def submit(self, kind: JobKind, body: dict[str, Any], now: float, *, fail: bool = False) -> SimJob:
        """Validate, charge and create a job (or a dry run, which is neither kept nor charged)."""
        self.validate(kind, body, now)
        dry_run = body.get("dry_run") is True
        cost = self.cost_of(kind, body)
        if not dry_run and self.tokens is not None:
            if cost > self.tokens:
                detail = f"Not enough tokens: this job costs {cost} and the balance is {self.tokens}."
                raise Rejected(403, detail)
            self.tokens -= cost
        job_id = f"TEST_{self.rng.getrandbits(32):08x}" if dry_run else self._new_id(PREFIX[kind])
        job = self._schedule(job_id, kind, body, now, fail=fail, dry_run=dry_run)
        if not dry_run:
            self.jobs[job_id] = job
            self.by_kind[kind].append(job)
            self.ledger.jobs.append(LedgerEntry(job_id, kind.value, job.config, job.tags, now, cost))
        return job

    def _schedule(
        self, job_id: str, kind: JobKind, body: dict[str, Any], now: float, *, fail: bool, dry_run: bool
    ) -> SimJob:
        s = self.settings
        rng = random.Random(f"{s.seed}/{job_id}")

        def jitter(x: float) -> float:
            return x * (1 + rng.uniform(-s.duration_jitter, s.duration_jitter))

        training = body if kind is JobKind.DREAMBOOTH else body.get("dreambooth")
        gens: list[dict[str, Any]] = [body] if kind is JobKind.IMAGE_GEN else list(body.get("image_gen") or [])
        run_s = 0.0
        if training is not None:
            run_s += s.dreambooth_base_s + s.dreambooth_s_per_step * int(training.get("steps", 1200))
        for gen in gens:
            run_s += s.image_base_s + s.image_s_per_sample * int(gen.get("num_samples", 1))
        if dry_run:
            queued_end, run_end = now, now
        else:
            queued_end = now + self._scaled(jitter(s.queue_s))
            if s.capacity is not None:
                if len(self._slots) >= s.capacity:
                    queued_end = max(queued_end, heapq.heappop(self._slots))
            run_end = queued_end + self._scaled(jitter(run_s))
            if s.capacity is not None:
                heapq.heappush(self._slots, run_end)
        fails = not dry_run and (fail or rng.random() < s.faults.rates.job_failure)
        fail_at = queued_end + (run_end - queued_end) * rng.uniform(0.1, 0.9) if fails else None
        failure = None
        if fails:
            reason, data = FAILURE_REASONS[rng.randrange(len(FAILURE_REASONS))]
            failure = (reason, {k: v.format(step=rng.randrange(1, 1000)) for k, v in data.items()})
        tags = [dict(t) for t in body.get("tags") or []]
        config = {k: v for k, v in body.items() if k not in ("tags", "dry_run")}
        job = SimJob(
            job_id=job_id,
            kind=kind,
            config=config,
            tags=tags,
            created=now,
            queued_end=queued_end,
            run_end=run_end,
            fail_at=fail_at,
            failure=failure,
            cost=self.cost_of(kind, body),
            callback=body.get("callback"),
            dry_run=dry_run,
        )
        if not fails:
            self._make_results(job, training, gens, rng)
        return job

    def _make_results(
        self, job: SimJob, training: dict[str, Any] | None, gens: list[dict[str, Any]], rng: random.Random
    ) -> None:
        s = self.settings
        deleted_at = job.run_end + self._scaled(s.retention_s)
        trained_id: str | None = None
        if training is not None:
            model = training.get("base_model", "stable-diffusion-v1-5")
            model_type = MODEL_TYPES.get(model, "sd-v1")
            steps = int(training.get("steps", 1200))
            full_bytes = s.sdxl_checkpoint_bytes if model_type == "sdxl-v1" else s.checkpoint_bytes
            wanted = [(st, False) for st in sorted(set(training.get("save_checkpoints_at") or [])) if st < steps]
            wanted.append((steps, False))
            if training.get("extract_lora", "original") != "disabled":
                wanted.append((steps, True))
            for step, is_lora in wanted:
                ckp_id = self._new_id("ckp_")
                lora = "lora_" if is_lora else ""
                name = f"dreamlookai_{model}_{lora}step_{step}_{job.job_id}_{ckp_id}.safetensors"
                if s.hostile_names:
                    name = f"..%2F..%2F%0Aevil%01{lora}{ckp_id}.safetensors"
                path = f"/storage/{BUCKET}/models/{job.job_id}/{name}"
                size = s.lora_bytes if is_lora else full_bytes
                content = FileContent(key=f"{s.seed}/{ckp_id}", size=size, safetensors=True)
                file = StoredFile(path, job.job_id, self._scaled(s.checkpoint_url_ttl_s), deleted_at, content=content)
                ckp = Checkpoint(ckp_id, file, is_lora, step, model_type)
                job.checkpoints.append(ckp)
                self._register(file)
                if not job.dry_run:
                    self.checkpoints[ckp_id] = (job, ckp)
                if step == steps and not is_lora:
                    trained_id = ckp_id
        for gen in gens:
            ckp_for = trained_id if training is not None else gen.get("checkpoint_id")
            width, height = int(gen.get("width", 512)), int(gen.get("height", 512))
            factor = min(1.0, s.image_max_px / max(width, height, 1))
            px_w, px_h = max(1, int(width * factor)), max(1, int(height * factor))
            base_seed = gen.get("seed", -1)
            images = []
            for idx in range(int(gen.get("num_samples", 1))):
                image_id = f"gi_{rng.getrandbits(48):012x}"
                seed = base_seed + idx if isinstance(base_seed, int) and base_seed >= 0 else rng.getrandbits(31)
                path = f"/storage/{BUCKET}/images/{job.job_id}/{image_id}.png"
                if s.hostile_names and idx == 0:  # a name of dots only: it must not become `..` on disk
                    path = f"/storage/{BUCKET}/images/{job.job_id}/{image_id}/..."
                png = (f"{s.seed}/{image_id}", px_w, px_h)
                file = StoredFile(path, job.job_id, self._scaled(s.image_url_ttl_s), deleted_at, png=png)
                images.append(Image(image_id, file, seed, idx))
                self._register(file)
            job.image_sets.append((ckp_for, images))

    def _register(self, file: StoredFile) -> None:
        self.files[file.path] = file

    def content_of(self, file: StoredFile) -> FileContent | None:
        """The file's bytes as of now: a rewrite gives it a new generation and new bytes."""
        if file.content is None or not self.generations[file.path]:
            return file.content
        gen = self.generations[file.path]
        return FileContent(
            key=f"{file.content.key}#g{gen}",
            size=file.content.size + self.resized[file.path],
            safetensors=True,
            corrupt_header=file.path in self.corrupt,
        )

    # -- reading ------------------------------------------------------------------

    def list_jobs(self, kind: JobKind, limit: int, offset: int) -> list[SimJob]:
        newest_first = self.by_kind[kind][::-1]
        return newest_first[offset : offset + limit]
