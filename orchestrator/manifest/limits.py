"""What values of the API's known fields make sense: one table, checked offline.

`fields.py` knows each field's type; this module knows its range. The API notes give no
numeric range, so each limit says where it comes from: the notes or the docs where they
speak, else a count below 1 or a negative rate, which cannot be meant (an error), or what
usual work looks like (a warning: the value is legal and may be intended). A rule marked
`refused` is one the service is taken to answer with 422; the simulator refuses it too
(`sim/validation.py`, checked by a test), so a rehearsal fails where the service would.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """The range of one numeric field: outside [low, high] an error, outside [below, above]
    a warning; `multiple` a warning when the value is not a multiple of it."""

    what: str  # the quantity and its unit, as the message says it
    usual: str  # what a usual value is, as the message suggests it
    low: float | None = None
    low_open: bool = False  # low itself is an error too (a rate of 0 trains nothing)
    high: float | None = None
    below: float | None = None
    above: float | None = None
    multiple: int | None = None
    refused: bool = False  # the service answers 422 outside [low, high]: the simulator must too


RULES: Mapping[str, Rule] = {
    # Each: unit; the error and its source; the warning and its source. "guess: refused" means
    # the service is taken to answer 422, and the simulator does.
    # training steps; < 1 trains nothing (guess: refused); > 4000: the docs use 100 and 1200, and
    # DreamBooth takes ~100 per training image, so more is likely a typo that costs tokens.
    "steps": Rule(what="training steps", usual="the docs use 1200", low=1, above=4000, refused=True),
    # per step; 0 trains nothing, a negative rate untrains (clearly wrong); > 1e-4: the docs use
    # 1e-6, and DreamBooth fine-tunes at 1e-6 to 1e-5 (a rate for LoRA training is ~1e-4).
    "learning_rate": Rule(what="a learning rate", usual="the docs use 1e-06", low=0, low_open=True, above=1e-4),
    # per step, text encoders; 0 leaves the encoder as it is (legal), negative is wrong; as above.
    "learning_rate_te": Rule(what="a learning rate", usual="the docs use 1e-06, or 0 to leave it", low=0, above=1e-4),
    "learning_rate_te1": Rule(what="a learning rate", usual="about 1e-06, or 0 to leave it", low=0, above=1e-4),
    "learning_rate_te2": Rule(what="a learning rate", usual="0 (SDXL needs 0)", low=0, above=1e-4),
    # images per job; < 1 is no job (guess: refused); > 32: each image costs tokens, and so many
    # from one prompt is rare (the simulator refuses more than 64, its own assumption).
    "num_samples": Rule(what="images", usual="1 to 8 is usual", low=1, above=32, refused=True),
    # pixels; < 1 is no image (guess: refused); > 2048 or not a multiple of 8: Stable Diffusion
    # works in 8-pixel blocks and was trained at 512 (SD 1.x) or 1024 (SDXL).
    "width": Rule(what="pixels", usual="512 or 1024 is usual", low=1, above=2048, multiple=8, refused=True),
    "height": Rule(what="pixels", usual="512 or 1024 is usual", low=1, above=2048, multiple=8, refused=True),
    # denoising steps; < 1 makes no image (guess: refused); > 150: 20 to 50 is usual, more adds
    # time and nothing visible.
    "num_inference_steps": Rule(what="denoising steps", usual="20 to 50 is usual", low=1, above=150, refused=True),
    # a factor (classifier-free guidance); no error: any number is legal; < 1 ignores the prompt,
    # > 30 burns the image; 5 to 10 is usual.
    "guidance_scale": Rule(what="a guidance factor", usual="5 to 10 is usual", below=1, above=30),
    # a seed; -1 draws one at random (api-notes), below that is no seed (guess: refused);
    # > 2**32 - 1: generators usually take 32 bits.
    "seed": Rule(what="a seed", usual="-1 for random, or 0 to 4294967295", low=-1, above=2**32 - 1, refused=True),
}

URL_FIELDS = frozenset({"image_urls", "captions_file_url", "callback"})
_URL = re.compile(r"^https?://[^/\s]+[^\s]*$", re.IGNORECASE)
_JOINED = re.compile(r",\s*https?://", re.IGNORECASE)  # a second URL after a comma, not a comma of a path


def check_value(name: str, value: Any, prefix: str = "") -> tuple[list[str], list[str]]:
    """(errors, warnings) for one field's value against its rule; nothing for other fields.
    The value's type is `fields.py`'s business: a value of the wrong type passes here."""
    errors: list[str] = []
    warnings: list[str] = []
    if name in URL_FIELDS:
        for i, url in enumerate(value if isinstance(value, list) else [value]):
            where = f"{prefix}{name}[{i}]" if isinstance(value, list) else f"{prefix}{name}"
            if isinstance(url, str) and joined_by_comma(url):
                errors.append(
                    f"field {where}: {url!r:.80} holds URLs joined by a comma; give each URL as its own list item "
                    "(in a CSV cell: separated by spaces or |)"
                )
            elif isinstance(url, str) and not _URL.match(url):
                # A warning, not an error: the service is the judge of what it can fetch.
                warnings.append(
                    f"field {where}: {url!r:.80} is not an http(s) URL; the service fetches it itself, "
                    "so give a public or presigned URL"
                )
        return errors, warnings
    rule = RULES.get(name)
    if rule is None or not _is_number(value):
        return errors, warnings
    field = f"field {prefix}{name} is {_show(value)}"
    if (rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low))) or (
        rule.high is not None and value > rule.high
    ):
        errors.append(f"{field}: give {_span(rule)} ({rule.what}; {rule.usual})")
    elif (rule.below is not None and value < rule.below) or (rule.above is not None and value > rule.above):
        warnings.append(f"{field}: unusual for {rule.what} ({rule.usual}); is it meant?")
    elif rule.multiple and value % rule.multiple:
        warnings.append(
            f"{field}: not a multiple of {rule.multiple} {rule.what}; the service may round or refuse it ({rule.usual})"
        )
    return errors, warnings


def check_checkpoint_steps(payload: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`save_checkpoints_at`: each a step of this training, so each one makes a checkpoint."""
    at, steps = payload.get("save_checkpoints_at"), payload.get("steps")
    if not isinstance(at, list):
        return []
    errors = []
    for step in at:
        if not _is_number(step):
            continue  # the type check names it
        if step < 1:
            errors.append(f"field {prefix}save_checkpoints_at holds {_show(step)}: a step is 1 or more")
        elif _is_number(steps) and step > steps:
            errors.append(
                f"field {prefix}save_checkpoints_at holds {_show(step)}, past the last of {_show(steps)} steps: "
                "no checkpoint would be saved there; lower it or raise steps"
            )
    return errors


def joined_by_comma(text: str) -> bool:
    """Two URLs joined by a comma, or one with a comma left on its end (a list written `a, b`)."""
    return bool(_JOINED.search(text)) or text.endswith(",") or text.startswith(",")


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _span(rule: Rule) -> str:
    if rule.low is not None and rule.high is not None:
        return f"between {rule.low:g} and {rule.high:g}"
    if rule.low is not None:
        return f"more than {rule.low:g}" if rule.low_open else f"at least {rule.low:g}"
    return f"at most {rule.high:g}"
