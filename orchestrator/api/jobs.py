"""Reading the API's job object tolerantly into a `RemoteJob`, and choosing its files.

Unknown states are kept as OTHER (never read as an ending); either type spelling is
accepted; a LoRA is known by `is_extracted_lora`/`checkpoint_type`, never by position.
Names from the server are made safe before they are ever used as paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from ..models import Artifact, ArtifactKind, RemoteJob, RemoteState

MAX_NAME_CHARS = 150
RESERVED_NAMES = frozenset({"job.json", "SHA256SUMS", "summary.json", "report.html"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _clean(raw: str) -> str:
    """The last path component, unsafe characters replaced, no leading dots (so never `.` or `..`)."""
    name = unquote(raw).replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE.sub("_", name).lstrip(".-_")


def safe_name(raw: str, fallback: str) -> str:
    """A file name that is safe on every file system and can never leave its folder.

    A name that cleans to nothing (`..`, `.`, only dots, empty) takes the cleaned
    `fallback` (the file's id), and `file` when that is no better.
    """
    name = _clean(raw) or _clean(fallback) or "file"
    if len(name) > MAX_NAME_CHARS:
        _, dot, ext = name.rpartition(".")
        keep = ext if dot and len(ext) <= 16 else ""
        name = name[: MAX_NAME_CHARS - len(keep) - 1] + ("." + keep if keep else "")
    if name in RESERVED_NAMES or name.endswith(".part"):
        name = "_" + name
    return name


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _percentage(value: Any) -> float | None:
    """`percentage_done` as a share the API could mean (0 to 100); anything else is no reading."""
    pct = _float(value)
    return pct if pct is not None and 0.0 <= pct <= 100.0 else None


def parse_time(value: Any) -> float | None:
    """The API's ISO 8601 times (UTC, usually without a zone) as Unix time."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _url_name(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1]


def parse_job(raw: Mapping[str, Any]) -> RemoteJob:
    raw_state = str(raw.get("state", ""))
    try:
        state = RemoteState(raw_state.lower())
    except ValueError:
        state = RemoteState.OTHER
    artifacts: list[Artifact] = []
    final: tuple[int, str] | None = None
    result = raw.get("dreambooth_result") or {}
    for ckp in result.get("checkpoints") or [] if isinstance(result, Mapping) else []:
        if not isinstance(ckp, Mapping) or not isinstance(ckp.get("url"), str):
            continue
        ckp_id = str(ckp.get("checkpoint_id") or "")
        is_lora = ckp.get("is_extracted_lora") is True or ckp.get("checkpoint_type") == "lora"
        step = ckp.get("training_step") if isinstance(ckp.get("training_step"), int) else None
        size = ckp.get("size_bytes") if isinstance(ckp.get("size_bytes"), int) else None
        artifacts.append(
            Artifact(
                name=_url_name(ckp["url"]),
                kind=ArtifactKind.LORA if is_lora else ArtifactKind.CHECKPOINT,
                remote_id=ckp_id or _url_name(ckp["url"]),
                url=ckp["url"],
                size_bytes=size,
                training_step=step,
                available=ckp.get("is_available") is not False,
            )
        )
        if not is_lora and ckp_id and (final is None or (step or 0) >= final[0]):
            final = (step or 0, ckp_id)
    for group in raw.get("image_gen_results") or []:
        images = group.get("generated_images") if isinstance(group, Mapping) else None
        for image in images or []:
            if isinstance(image, Mapping) and isinstance(image.get("url"), str):
                image_id = str(image.get("generated_image_id") or _url_name(image["url"]))
                artifacts.append(
                    Artifact(
                        name=_url_name(image["url"]),
                        kind=ArtifactKind.IMAGE,
                        remote_id=image_id,
                        url=image["url"],
                    )
                )
    tags = tuple(
        (t["key"], t["value"])
        for t in raw.get("tags") or []
        if isinstance(t, Mapping) and isinstance(t.get("key"), str) and isinstance(t.get("value"), str)
    )
    reason = raw.get("failure_reason")
    data = raw.get("failure_reason_data")
    if reason and isinstance(data, Mapping) and data.get("message"):
        reason = f"{reason}: {data['message']}"
    return RemoteJob(
        job_id=str(raw.get("job_id", "")),
        state=state,
        raw_state=raw_state,
        percentage_done=_percentage(raw.get("percentage_done")),
        running_duration_s=_float(raw.get("running_duration")),
        finished_at=parse_time(raw.get("state_running_end")),
        failure_reason=str(reason) if reason else None,
        artifacts=tuple(_unique_names(artifacts)),
        final_checkpoint_id=final[1] if final else None,
        tags=tags,
        raw=raw,
    )


def _unique_names(artifacts: list[Artifact]) -> list[Artifact]:
    out, used = [], set()
    for a in artifacts:
        name = safe_name(a.name, a.remote_id)
        if name in used:
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}-{a.remote_id}.{ext}" if dot else f"{name}-{a.remote_id}"
            name = safe_name(name, a.remote_id)
        used.add(name)
        out.append(
            Artifact(
                name=name,
                kind=a.kind,
                remote_id=a.remote_id,
                url=a.url,
                size_bytes=a.size_bytes,
                training_step=a.training_step,
                available=a.available,
            )
        )
    return out


def select(job: RemoteJob, wanted: frozenset[str] | None) -> list[Artifact]:
    """The files the manifest's `download:` asks for (None: everything the job made)."""
    if wanted is None:
        return list(job.artifacts)
    final_step = max((a.training_step or 0 for a in job.artifacts if a.kind is ArtifactKind.CHECKPOINT), default=0)
    chosen = []
    for a in job.artifacts:
        if a.kind is ArtifactKind.IMAGE:
            keep = "images" in wanted
        elif a.kind is ArtifactKind.LORA:
            keep = "lora" in wanted
        elif (a.training_step or 0) >= final_step:
            keep = "checkpoint" in wanted
        else:
            keep = "intermediate" in wanted
        if keep:
            chosen.append(a)
    return chosen
