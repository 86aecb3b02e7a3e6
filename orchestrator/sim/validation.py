"""The simulator's check of submit bodies, answering as FastAPI would (422 `detail` list).

It follows api-notes.md: known fields are type-checked, unknown ones ignored (as
pydantic does by default), except `text_encoder_training`, which the real service
treats as a switch to a retired mode and which we refuse loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

SD1_MODELS = frozenset(
    {
        "stable-diffusion-v1-5",
        "realistic-vision-v3-0",
        "realistic-vision-v5-1",
        "cyberrealistic-v3-1",
    }
)
SDXL_MODELS = frozenset({"stable-diffusion-xl-v1-0", "realism-engine-sdxl-v3-0"})
MODEL_TYPES = {**{m: "sd-v1" for m in SD1_MODELS}, **{m: "sdxl-v1" for m in SDXL_MODELS}}

# Integer ranges (least, greatest) the service is taken to enforce: a count below 1 is no job, a seed
# below -1 no seed (-1 draws one, api-notes). The upper bounds are this simulator's own assumption.
RANGES: dict[str, tuple[int, int | None]] = {
    "steps": (1, 10_000),  # training steps
    "num_samples": (1, 64),  # images per job
    "width": (1, None),  # pixels
    "height": (1, None),  # pixels
    "num_inference_steps": (1, None),  # denoising steps
    "seed": (-1, None),
}

Error = dict[str, Any]
Check = Callable[[Any], "tuple[str, str] | None"]  # (type, msg) when invalid


def _is_str(v: Any) -> tuple[str, str] | None:
    return None if isinstance(v, str) else ("type_error.str", "str type expected")


def _is_int(v: Any) -> tuple[str, str] | None:
    ok = isinstance(v, int) and not isinstance(v, bool)
    return None if ok else ("type_error.integer", "value is not a valid integer")


def _is_num(v: Any) -> tuple[str, str] | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    return None if ok else ("type_error.float", "value is not a valid float")


def _is_bool(v: Any) -> tuple[str, str] | None:
    return None if isinstance(v, bool) else ("type_error.bool", "value could not be parsed to a boolean")


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> tuple[str, str] | None:
        if v in choices:
            return None
        return ("type_error.enum", f"value is not a valid enumeration member; permitted: {choices}")

    return check


def _list_of(item: Check) -> Check:
    def check(v: Any) -> tuple[str, str] | None:
        if not isinstance(v, list):
            return ("type_error.list", "value is not a valid list")
        for element in v:
            problem = item(element)
            if problem:
                return problem
        return None

    return check


def _tag(v: Any) -> tuple[str, str] | None:
    if isinstance(v, dict) and isinstance(v.get("key"), str) and isinstance(v.get("value"), str):
        return None
    return ("type_error.dict", "a tag is an object {key: str, value: str}")


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


COMMON: dict[str, Check] = {
    "priority": _optional(_is_int),
    "callback": _optional(_is_str),
    "dry_run": _optional(_is_bool),
    "tags": _optional(_list_of(_tag)),
}
DREAMBOOTH: dict[str, Check] = {
    "image_urls": _list_of(_is_str),
    "instance_prompt": _is_str,
    "base_model": _is_str,
    "steps": _is_int,
    "learning_rate": _is_num,
    "learning_rate_te": _optional(_is_num),
    "learning_rate_te1": _optional(_is_num),
    "learning_rate_te2": _optional(_is_num),
    "model_type": _one_of("sd-v1", "sdxl-v1"),
    "saved_model_format": _one_of("original"),
    "saved_model_weights_format": _one_of("safetensors"),
    "crop_method": _one_of("center", "face"),
    "extract_lora": _one_of("disabled", "original"),
    "enable_offset_noise": _is_bool,
    "save_checkpoints_at": _optional(_list_of(_is_int)),
    "captions_file_url": _optional(_is_str),
}
DREAMBOOTH_REQUIRED = ("image_urls", "instance_prompt", "base_model")
IMAGE_GEN: dict[str, Check] = {
    "prompt": _is_str,
    "negative_prompt": _optional(_is_str),
    "num_samples": _is_int,
    "width": _is_int,
    "height": _is_int,
    "num_inference_steps": _is_int,
    "guidance_scale": _is_num,
    "scheduler_type": _is_str,
    "seed": _is_int,
    "enable_hrf": _is_bool,
    "model_type": _one_of("sd-v1", "sdxl-v1"),
    "base_model": _optional(_is_str),
    "checkpoint_id": _optional(_is_str),
}
IMAGE_GEN_REQUIRED = ("prompt",)


def _err(loc: list[str | int], kind: str, msg: str) -> Error:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


def check_fields(
    body: Mapping[str, Any],
    schema: Mapping[str, Check],
    required: tuple[str, ...],
    loc: list[str | int],
) -> list[Error]:
    errors = [
        _err([*loc, name], "value_error.missing", "field required") for name in required if body.get(name) is None
    ]
    for name, check in schema.items():
        if name in body and not (body[name] is None and name not in required):
            problem = check(body[name])
            if problem:
                errors.append(_err([*loc, name], *problem))
    return errors


def check_dreambooth(body: Mapping[str, Any], loc: list[str | int]) -> list[Error]:
    errors = check_fields(body, DREAMBOOTH, DREAMBOOTH_REQUIRED, loc)
    if "text_encoder_training" in body:
        msg = "text_encoder_training is retired; remove the key (its presence changes SDXL mode)"
        errors.append(_err([*loc, "text_encoder_training"], "value_error.retired", msg))
    urls = body.get("image_urls")
    if isinstance(urls, list) and not urls:
        errors.append(
            _err([*loc, "image_urls"], "value_error.list.min_items", "ensure this value has at least 1 items")
        )
    errors += _check_model(body, loc)
    if MODEL_TYPES.get(body.get("base_model", "")) == "sdxl-v1":
        te2 = body.get("learning_rate_te2")
        if te2 not in (None, 0, 0.0):
            errors.append(_err([*loc, "learning_rate_te2"], "value_error", "learning_rate_te2 must be 0 for SDXL"))
    return errors + _check_ranges(body, loc, ("steps",))


def check_image_gen(
    body: Mapping[str, Any], loc: list[str | int], checkpoint_ok: Callable[[str], str | None]
) -> list[Error]:
    """`checkpoint_ok(id)` answers None when the checkpoint may be used, else why not."""
    errors = check_fields(body, IMAGE_GEN, IMAGE_GEN_REQUIRED, loc)
    has_base, has_ckp = body.get("base_model") is not None, body.get("checkpoint_id") is not None
    if has_base == has_ckp:
        errors.append(_err([*loc, "base_model"], "value_error", "give exactly one of base_model or checkpoint_id"))
    if has_base:
        errors += _check_model(body, loc)
    if has_ckp and isinstance(body["checkpoint_id"], str):
        why = checkpoint_ok(body["checkpoint_id"])
        if why:
            errors.append(_err([*loc, "checkpoint_id"], "value_error.checkpoint", why))
    return errors + _check_ranges(body, loc, ("num_samples", "width", "height", "num_inference_steps", "seed"))


def _check_ranges(body: Mapping[str, Any], loc: list[str | int], names: tuple[str, ...]) -> list[Error]:
    errors = []
    for name in names:
        value, (low, high) = body.get(name), RANGES[name]
        if not isinstance(value, int) or isinstance(value, bool):
            continue  # absent, or the type check has said it
        if value < low:
            errors.append(_err([*loc, name], "value_error.number.not_ge", f"ensure this value is >= {low}"))
        elif high is not None and value > high:
            errors.append(_err([*loc, name], "value_error.number.not_le", f"ensure this value is <= {high}"))
    return errors


def _check_model(body: Mapping[str, Any], loc: list[str | int]) -> list[Error]:
    model = body.get("base_model")
    if isinstance(model, str) and model not in MODEL_TYPES:
        return [_err([*loc, "base_model"], "value_error.base_model", f"unknown base_model {model!r}")]
    declared = body.get("model_type")
    if isinstance(model, str) and declared is not None and MODEL_TYPES[model] != declared:
        msg = f"model_type {declared!r} does not match base_model {model!r}"
        return [_err([*loc, "model_type"], "value_error", msg)]
    return []
