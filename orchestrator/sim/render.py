"""The job object as the API returns it, shaped field by field like the vendor's example.

Every render signs the result URLs afresh, so a GET of the job renews them.
"""

from __future__ import annotations

from typing import Any

from . import signing
from .service import JobKind, SimJob, StoredFile, iso

DREAMBOOTH_CONFIG_DEFAULTS: dict[str, Any] = {
    "image_urls": [],
    "instance_prompt": None,
    "steps": 1200,
    "saved_model_format": "original",
    "saved_model_weights_format": "safetensors",
    "base_model": None,
    "checkpoint_id": None,
    "crop_method": "center",
    "learning_rate": 1e-06,
    "learning_rate_te": 1e-06,
    "learning_rate_te1": None,
    "learning_rate_te2": None,
    "enable_offset_noise": False,
    "callback": None,
    "extract_lora": "original",
    "captions_file_url": None,
    "save_checkpoints_at": None,
    "text_encoder_training": None,
    "checkpoint_availability_mode": "standard",
    "priority": 100,
}


class Renderer:
    def __init__(self, secret: bytes, base_url: str, image_type_spelling: str) -> None:
        self.secret = secret
        self.base_url = base_url
        self.image_type_spelling = image_type_spelling

    def url(self, file: StoredFile, now: float) -> str:
        return f"{self.base_url}{file.path}?{signing.sign(self.secret, file.path, now, file.ttl_s)}"

    def job_type(self, kind: JobKind) -> str:
        if kind is JobKind.DREAMBOOTH:
            return kind.value
        return kind.value.replace("image_gen", self.image_type_spelling)

    def job(self, job: SimJob, now: float, *, with_tags: bool = True) -> dict[str, Any]:
        state = job.state_at(now)
        running_start = job.queued_end if state != "queued" else None
        running_end = job.end if state in ("success", "failure") else None
        if state == "queued":
            updated = job.created
        elif state == "running":
            updated = job.queued_end
        else:
            updated = job.end
        if state == "queued":
            pct = 0
        elif state == "success":
            pct = 100
        else:
            span = max(job.run_end - job.queued_end, 1e-9)
            pct = int(100 * (min(now, job.end) - job.queued_end) / span)
        config = dict(job.config)
        if job.kind is JobKind.DREAMBOOTH:
            config = {**DREAMBOOTH_CONFIG_DEFAULTS, **config}
        done = state == "success"
        obj: dict[str, Any] = {
            "job_type": self.job_type(job.kind),
            "job_id": job.job_id,
            "state": state,
            "state_updated": iso(updated),
            "state_running_start": iso(running_start),
            "state_running_end": iso(running_end),
            "state_queued_start": iso(job.created),
            "state_queued_end": iso(running_start),
            "queued_duration": (running_start - job.created) if running_start else None,
            "running_duration": (min(now, job.end) - job.queued_end) if running_start else None,
            "queueing_state": "default",
            "config": config,
            "dreambooth_result": None,
            "image_gen_results": None,
            "percentage_done": min(max(pct, 0), 100),
            "failure_reason": job.failure[0] if job.failure and state == "failure" else None,
            "failure_reason_data": job.failure[1] if job.failure and state == "failure" else None,
            "thumbnails": None,
        }
        if with_tags:
            obj["tags"] = job.tags
        if done and job.checkpoints:
            obj["dreambooth_result"] = {
                "checkpoints": [
                    {
                        "checkpoint_id": c.checkpoint_id,
                        "url": self.url(c.file, now),
                        "is_extracted_lora": c.is_lora,
                        "model_type": c.model_type,
                        "checkpoint_type": "lora" if c.is_lora else "checkpoint",
                        "training_step": c.step,
                        "size_bytes": c.file.content.size if c.file.content else None,
                        "file_format": "safetensors",
                        "availability_mode": "standard",
                        "is_available": now < c.file.deleted_at,
                    }
                    for c in job.checkpoints
                ],
                "sanitized_images": [],
            }
        if done and job.image_sets:
            obj["image_gen_results"] = [
                {
                    "checkpoint_id": ckp_id,
                    "config_idx": idx,
                    "generated_images": [
                        {
                            "generated_image_id": im.image_id,
                            "url": self.url(im.file, now),
                            "seed": im.seed,
                            "generation_idx": im.generation_idx,
                        }
                        for im in images
                    ],
                }
                for idx, (ckp_id, images) in enumerate(job.image_sets)
            ]
        return obj
