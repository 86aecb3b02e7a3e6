"""What the client knows of each job type's API fields, for offline checks.

From the vendor's documentation and public clients. A known field with the wrong type is an
error; an unknown field passes with a warning (the API may have grown); a field
the docs forbid is an error. Which base models exist is the server's call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..models import JobType
from . import limits

Check = Callable[[Any], bool]


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(_int(x) for x in v)


def _tags(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(t, dict) and isinstance(t.get("key"), str) and isinstance(t.get("value"), str) for t in v
    )


def _one_of(*choices: str) -> Check:
    return lambda v: v in choices


# field -> (check, what the user should write)
Field = tuple[Check, str]
COMMON: dict[str, Field] = {
    "priority": (_int, "an integer"),
    "callback": (_str, "a URL"),
    "tags": (_tags, "a list of {key, value} strings"),
}
MODEL: dict[str, Field] = {
    "base_model": (_str, "a model name such as stable-diffusion-v1-5"),
    "model_type": (_one_of("sd-v1", "sdxl-v1"), "sd-v1 or sdxl-v1"),
}
DREAMBOOTH: dict[str, Field] = {
    **COMMON,
    **MODEL,
    "image_urls": (_strs, "a list of image URLs"),
    "instance_prompt": (_str, "text"),
    "steps": (_int, "an integer"),
    "learning_rate": (_num, "a number"),
    "learning_rate_te": (_num, "a number"),
    "learning_rate_te1": (_num, "a number"),
    "learning_rate_te2": (_num, "a number (0 for SDXL)"),
    "saved_model_format": (_one_of("original"), "original"),
    "saved_model_weights_format": (_one_of("safetensors"), "safetensors"),
    "crop_method": (_one_of("center", "face"), "center or face"),
    "extract_lora": (_one_of("disabled", "original"), "disabled or original"),
    "enable_offset_noise": (_bool, "true or false"),
    "save_checkpoints_at": (_ints, "a list of step numbers"),
    "captions_file_url": (_str, "a URL"),
    "checkpoint_id": (_str, "a ckp_ id"),
}
IMAGE_GEN: dict[str, Field] = {
    **COMMON,
    **MODEL,
    "prompt": (_str, "text"),
    "negative_prompt": (_str, "text"),
    "num_samples": (_int, "an integer"),
    "width": (_int, "an integer"),
    "height": (_int, "an integer"),
    "num_inference_steps": (_int, "an integer"),
    "guidance_scale": (_num, "a number"),
    "scheduler_type": (_str, "a scheduler name"),
    "seed": (_int, "an integer (-1: random)"),
    "enable_hrf": (_bool, "true or false"),
    "checkpoint_id": (_str, "a ckp_ id"),
}
COMBINED: dict[str, Field] = {**COMMON}
FIELDS: Mapping[JobType, dict[str, Field]] = {
    JobType.DREAMBOOTH: DREAMBOOTH,
    JobType.IMAGE_GEN: IMAGE_GEN,
    JobType.DREAMBOOTH_IMAGE_GEN: COMBINED,
}
REQUIRED: Mapping[JobType, tuple[str, ...]] = {
    JobType.DREAMBOOTH: ("image_urls", "instance_prompt"),
    JobType.IMAGE_GEN: ("prompt",),
    JobType.DREAMBOOTH_IMAGE_GEN: ("dreambooth", "image_gen"),
}
FORBIDDEN = {
    "text_encoder_training": "remove it: its mere presence switches SDXL to a retired mode",
    "dry_run": "use the --dry-run option instead, so the run knows nothing is charged",
}
SDXL_MODELS = frozenset({"stable-diffusion-xl-v1-0", "realism-engine-sdxl-v3-0"})
LIST_FIELDS = frozenset(k for k, (check, _) in {**DREAMBOOTH, **IMAGE_GEN}.items() if check in (_strs, _ints))


def coerce_text(field: str, text: str) -> Any:
    """A CSV cell for a known field, as the type that field wants (text stays text)."""
    check = {**DREAMBOOTH, **IMAGE_GEN}.get(field, (None, ""))[0]
    value: Any = text
    try:
        if check is _int:
            value = int(text)
        elif check is _num:
            value = float(text)
        elif check is _bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = text.lower() in ("true", "1", "yes")
        elif check is _strs:
            value = [item.strip(",") for item in _LIST_SPLIT.split(text) if item.strip(",")]
        elif check is _ints:
            value = [int(x) for x in text.replace("|", " ").replace(",", " ").split()]
    except ValueError:
        return text  # left as text: the type check reports it with its place
    return value


# Spaces and | separate a CSV cell's list; a comma only where a URL follows it, since a comma
# can be part of a URL (image CDNs put them in paths).
_LIST_SPLIT = re.compile(r"[\s|]+|,(?=\s*https?://)", re.IGNORECASE)


def joined_by_commas(field: str, text: str) -> bool:
    """A CSV cell of a list of URLs whose URLs are separated by commas (not how CSV lists are written)."""
    if {**DREAMBOOTH, **IMAGE_GEN}.get(field, (None, ""))[0] is not _strs:
        return False
    return any(limits.joined_by_comma(item) for item in text.replace("|", " ").split())


def check_payload(job_type: JobType, payload: Mapping[str, Any], prefix: str = "") -> tuple[list[str], list[str]]:
    """(errors, warnings) for one payload, each a sentence naming the field."""
    errors: list[str] = []
    warnings: list[str] = []
    known = FIELDS[job_type]
    for name in REQUIRED[job_type]:
        if payload.get(name) in (None, "", []):
            errors.append(f"missing required field {prefix}{name}")
    for name, value in payload.items():
        if name in FORBIDDEN:
            errors.append(f"field {prefix}{name} is not allowed: {FORBIDDEN[name]}")
        elif name in known:
            check, wanted = known[name]
            if isinstance(value, float) and not math.isfinite(value):
                errors.append(f"field {prefix}{name} is {value}: give a finite number")
            elif value is not None and not check(value):
                errors.append(f"field {prefix}{name} should be {wanted}, not {value!r:.60}")
            elif value is not None:
                e, w = limits.check_value(name, value, prefix)
                errors, warnings = errors + e, warnings + w
        elif job_type is not JobType.DREAMBOOTH_IMAGE_GEN or name not in ("dreambooth", "image_gen"):
            warnings.append(f"unknown field {prefix}{name} is sent as written (check its spelling)")
    if job_type is JobType.DREAMBOOTH:
        errors += limits.check_checkpoint_steps(payload, prefix)
    if job_type is JobType.DREAMBOOTH and payload.get("base_model") in SDXL_MODELS:
        if payload.get("learning_rate_te2") not in (None, 0, 0.0):
            errors.append(f"field {prefix}learning_rate_te2 must be 0 for SDXL models")
        if "learning_rate_te" in payload:
            warnings.append(f"field {prefix}learning_rate_te is for SD 1.x; SDXL uses learning_rate_te1")
    return errors, warnings
