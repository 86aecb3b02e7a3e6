"""Manifests (YAML, JSON, JSON Lines) into a validated `Manifest` of `JobSpec`s.

Every problem is collected, with its file, line and job, before anything is
reported, so `validate` shows them all at once. No I/O beyond reading files.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ManifestError, Problem
from ..models import DOWNLOAD_CHOICES, JobSpec, JobType, Location
from . import fields
from .sources import LineDict, iter_csv_rows, iter_json_lines, load_document, read_text

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ORCHESTRATION_KEYS = frozenset({"id", "type", "download", "checkpoint_from"})
TOP_LEVEL_KEYS = frozenset({"campaign", "defaults", "jobs", "bulk"})
CAMPAIGN_TAG_KEY = "dreamlook-batch"


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path
    campaign: str
    jobs: tuple[JobSpec, ...]
    warnings: tuple[Problem, ...]
    origin: str | None = None  # where a campaign joined without its file was read from (a database)

    @property
    def by_id(self) -> dict[str, JobSpec]:
        return {j.id: j for j in self.jobs}


def spec_fingerprint(spec: JobSpec) -> str:
    """What was sent, as a hash: a change after submission is reported, not resubmitted."""
    canon = json.dumps(
        {"type": spec.type.value, "payload": spec.payload, "from": spec.checkpoint_from},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def load_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest; raise ManifestError listing every problem."""
    path = Path(path)
    problems: list[Problem] = []
    if not path.is_file():  # a folder, a missing file: read_text says which, precisely
        read_text(path, problems, "manifest")
        raise ManifestError(problems or [Problem(str(path), None, None, "not a regular file")])
    default_campaign = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem) or "campaign"
    if path.suffix.lower() == ".jsonl":
        rows = list(iter_json_lines(path, problems))
        header: LineDict = rows.pop(0) if rows and "id" not in rows[0] and "type" not in rows[0] else LineDict()
        doc = LineDict({**header, "jobs": rows})
        doc.line = 1
    else:
        doc = load_document(path, problems)
        if doc is None and not problems:
            problems.append(Problem(str(path), None, None, "the file is empty"))
    specs: list[JobSpec] = []
    campaign = default_campaign
    if isinstance(doc, dict):
        campaign, specs = _read_document(path, doc, default_campaign, problems)
    elif doc is not None:
        problems.append(Problem(str(path), 1, None, "the manifest must be a mapping with a `jobs` list"))
    _check_ids_and_dependencies(specs, problems)
    errors = [p for p in problems if not p.warning]
    if errors:
        raise ManifestError(problems)
    return Manifest(path, campaign, tuple(specs), tuple(p for p in problems if p.warning))


def _read_document(
    path: Path, doc: Mapping[str, Any], default_campaign: str, problems: list[Problem]
) -> tuple[str, list[JobSpec]]:
    file = str(path)
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            problems.append(
                Problem(
                    file,
                    _line(doc),
                    None,
                    f"unknown top-level key {key!r}; expected one of {sorted(TOP_LEVEL_KEYS)}",
                )
            )
    campaign = doc.get("campaign", default_campaign)
    if not isinstance(campaign, str) or not ID_RE.match(campaign):
        problems.append(Problem(file, _line(doc), None, f"campaign {campaign!r} must match {ID_RE.pattern}"))
        campaign = default_campaign
    defaults = _read_defaults(file, doc.get("defaults"), problems)
    raw_jobs = doc.get("jobs") or []
    if not isinstance(raw_jobs, list):
        problems.append(Problem(file, _line(doc), None, "`jobs` must be a list"))
        raw_jobs = []
    specs = [spec for raw in raw_jobs if (spec := _read_job(file, raw, defaults, problems)) is not None]
    bulk = doc.get("bulk") or []
    if not isinstance(bulk, list):
        problems.append(Problem(file, _line(doc), None, "`bulk` must be a list of {rows, template}"))
        bulk = []
    for block in bulk:
        specs.extend(_expand_bulk(path, block, defaults, problems))
    if not specs and not problems:
        problems.append(Problem(file, _line(doc), None, "the manifest has no jobs (add `jobs:` or `bulk:`)"))
    return campaign, specs


def _line(obj: Any) -> int | None:
    return getattr(obj, "line", None)


def _read_defaults(file: str, raw: Any, problems: list[Problem]) -> dict[JobType, dict[str, Any]]:
    out: dict[JobType, dict[str, Any]] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        problems.append(Problem(file, None, None, "`defaults` must map a job type to its fields"))
        return out
    for name, values in raw.items():
        job_type = JobType.parse(str(name))
        if job_type is None or not isinstance(values, dict):
            msg = f"defaults.{name}: expected a job type ({', '.join(JobType)}) mapping to fields"
            problems.append(Problem(file, _line(raw), None, msg))
            continue
        out[job_type] = dict(values)
    return out


def _read_job(
    file: str, raw: Any, defaults: Mapping[JobType, Mapping[str, Any]], problems: list[Problem]
) -> JobSpec | None:
    line = _line(raw)
    if not isinstance(raw, dict):
        problems.append(Problem(file, line, None, "each job must be a mapping with `id` and `type`"))
        return None
    job_id = raw.get("id")
    if not isinstance(job_id, str) or not ID_RE.match(job_id):
        problems.append(Problem(file, line, None, f"job id {job_id!r} must match {ID_RE.pattern}"))
        return None

    def report(message: str, *, warning: bool = False) -> None:
        problems.append(Problem(file, line, job_id, message, warning))

    job_type = JobType.parse(str(raw.get("type", "")))
    if job_type is None:
        report(f"type {raw.get('type')!r} must be one of {', '.join(JobType)}")
        return None
    checkpoint_from = raw.get("checkpoint_from")
    if checkpoint_from is not None and not isinstance(checkpoint_from, str):
        report("checkpoint_from must be the id of a training job")
        checkpoint_from = None
    if checkpoint_from is not None and job_type is JobType.DREAMBOOTH_IMAGE_GEN:
        report("checkpoint_from is for image_gen (and dreambooth) jobs, not dreambooth_image_gen")
    own = {k: v for k, v in raw.items() if k not in ORCHESTRATION_KEYS}
    payload = _merge_defaults(job_type, own, defaults, checkpoint_from is not None, report)
    download = _read_download(raw.get("download"), report)
    errors, warnings = _check(job_type, payload, checkpoint_from is not None)
    for message in errors:
        report(message)
    for message in warnings:
        report(message, warning=True)
    return JobSpec(
        id=job_id,
        type=job_type,
        payload=payload,
        download=download,
        checkpoint_from=checkpoint_from,
        location=Location(file, line),
    )


def _merge_defaults(
    job_type: JobType,
    own: dict[str, Any],
    defaults: Mapping[JobType, Mapping[str, Any]],
    has_parent: bool,
    report: Any,
) -> dict[str, Any]:
    if job_type is JobType.DREAMBOOTH_IMAGE_GEN:
        merged = {**defaults.get(job_type, {}), **own}
        training = merged.get("dreambooth")
        if isinstance(training, dict):
            merged["dreambooth"] = {**defaults.get(JobType.DREAMBOOTH, {}), **training}
        gens = merged.get("image_gen")
        if isinstance(gens, dict):
            gens = [gens]
        if isinstance(gens, list):
            image_defaults = {
                k: v for k, v in defaults.get(JobType.IMAGE_GEN, {}).items() if k not in ("base_model", "checkpoint_id")
            }
            merged["image_gen"] = [{**image_defaults, **g} if isinstance(g, dict) else g for g in gens]
        return merged
    base = dict(defaults.get(job_type, {}))
    if has_parent:
        # checkpoint_from supplies the model: a default model would contradict it.
        for key in ("base_model", "checkpoint_id"):
            base.pop(key, None)
            if key in own:
                report(f"{key} conflicts with checkpoint_from (which supplies the checkpoint): remove it")
    return {**base, **own}


def _check(job_type: JobType, payload: Mapping[str, Any], has_parent: bool) -> tuple[list[str], list[str]]:
    if job_type is not JobType.DREAMBOOTH_IMAGE_GEN:
        errors, warnings = fields.check_payload(job_type, payload)
        if (
            job_type is JobType.IMAGE_GEN
            and not has_parent
            and not (payload.get("base_model") or payload.get("checkpoint_id"))
        ):
            errors.append("give base_model, checkpoint_id or checkpoint_from: the model to generate with")
        return errors, warnings
    errors, warnings = fields.check_payload(job_type, payload)
    training, gens = payload.get("dreambooth"), payload.get("image_gen")
    if training is not None and not isinstance(training, dict):
        errors.append("field dreambooth should be a mapping of training fields")
    elif isinstance(training, dict):
        e, w = fields.check_payload(JobType.DREAMBOOTH, training, "dreambooth.")
        errors, warnings = errors + e, warnings + w
    if gens is not None:
        if not isinstance(gens, list):
            errors.append("field image_gen should be a list of generation settings")
        for i, gen in enumerate(gens if isinstance(gens, list) else []):
            if not isinstance(gen, dict):
                errors.append(f"image_gen[{i}] should be a mapping")
                continue
            e, w = fields.check_payload(JobType.IMAGE_GEN, gen, f"image_gen[{i}].")
            errors, warnings = errors + e, warnings + w
    return errors, warnings


def _read_download(raw: Any, report: Any) -> frozenset[str] | None:
    if raw is None:
        return None
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        report(f"download must be a list of {sorted(DOWNLOAD_CHOICES)}")
        return None
    wrong = [x for x in items if x not in DOWNLOAD_CHOICES | {"all", "none"}]
    if wrong:
        report(f"download: unknown choice(s) {wrong}; choose from {sorted(DOWNLOAD_CHOICES)}, all or none")
    if "all" in items:
        return None
    return frozenset(x for x in items if x in DOWNLOAD_CHOICES)


def _expand_bulk(
    path: Path, block: Any, defaults: Mapping[JobType, Mapping[str, Any]], problems: list[Problem]
) -> Iterable[JobSpec]:
    """One template x the rows of a CSV or JSON Lines file."""
    file = str(path)
    if (
        not isinstance(block, dict)
        or not isinstance(block.get("rows"), str)
        or not isinstance(block.get("template"), dict)
    ):
        problems.append(
            Problem(
                file,
                _line(block),
                None,
                "each bulk entry needs `rows: FILE.csv|FILE.jsonl` and `template: {...}`",
            )
        )
        return
    rows_path = (path.parent / block["rows"]).resolve()
    if not rows_path.exists():
        problems.append(
            Problem(
                file,
                _line(block),
                None,
                f"bulk rows file {block['rows']!r} not found (looked at {rows_path})",
            )
        )
        return
    reader = iter_json_lines if rows_path.suffix.lower() == ".jsonl" else iter_csv_rows
    template = block["template"]
    for row in reader(rows_path, problems):
        notes: list[str] = []  # what a cell got wrong, said with the job it became
        rendered = _render(template, row, from_csv=reader is iter_csv_rows, field="", notes=notes)
        if isinstance(rendered, _Missing):
            problems.append(
                Problem(
                    str(rows_path),
                    row.line,
                    None,
                    f"the template uses column {rendered.column!r}, which this row lacks (it has: {', '.join(row)})",
                )
            )
            continue
        rendered = LineDict(rendered)
        rendered.line = row.line
        job_id = rendered.get("id") if isinstance(rendered.get("id"), str) else None
        problems.extend(Problem(str(rows_path), row.line, job_id, note) for note in notes)
        spec = _read_job(str(rows_path), rendered, defaults, problems)
        if spec is not None:
            yield spec


@dataclass(frozen=True, slots=True)
class _Missing:
    column: str


_FORMATTER = string.Formatter()


def _render(value: Any, row: Mapping[str, Any], *, from_csv: bool, field: str, notes: list[str]) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            rendered = _render(v, row, from_csv=from_csv, field=k, notes=notes)
            if isinstance(rendered, _Missing):
                return rendered
            out[k] = rendered
        return out
    if isinstance(value, list):
        items = [_render(v, row, from_csv=from_csv, field=field, notes=notes) for v in value]
        missing = next((i for i in items if isinstance(i, _Missing)), None)
        return missing if missing else items
    if not isinstance(value, str) or "{" not in value:
        return value
    names = [name for _, name, _, _ in _FORMATTER.parse(value) if name]
    for name in names:
        if name not in row:
            return _Missing(name)
    whole = re.fullmatch(r"\{(\w+)\}", value)
    if whole:  # the cell itself, typed: a JSON row keeps its lists, a CSV cell is coerced
        column, cell = whole.group(1), row[whole.group(1)]
        if not (from_csv and isinstance(cell, str)):
            return cell
        if fields.joined_by_commas(field, cell):
            notes.append(
                f"column {column!r} separates its URLs with commas; separate several URLs with spaces or | "
                "(a comma can be part of a URL)"
            )
        return fields.coerce_text(field, cell)
    return value.format_map(row)


def _check_ids_and_dependencies(specs: list[JobSpec], problems: list[Problem]) -> None:
    seen: dict[str, JobSpec] = {}
    for spec in specs:
        first = seen.get(spec.id)
        if first is not None:
            where = f"{first.location.file}:{first.location.line}"
            problems.append(
                Problem(
                    spec.location.file,
                    spec.location.line,
                    spec.id,
                    f"duplicate job id (first defined at {where})",
                )
            )
        else:
            seen[spec.id] = spec
    for spec in specs:
        parent_id = spec.checkpoint_from
        if parent_id is None:
            continue
        parent = seen.get(parent_id)
        loc = spec.location
        if parent is None:
            problems.append(
                Problem(
                    loc.file,
                    loc.line,
                    spec.id,
                    f"checkpoint_from {parent_id!r} names no job of this manifest",
                )
            )
        elif not parent.type.trains:
            problems.append(
                Problem(
                    loc.file,
                    loc.line,
                    spec.id,
                    f"checkpoint_from {parent_id!r} is a {parent.type} job, which makes no checkpoint",
                )
            )
    # Cycles: follow each chain; a chain longer than the job count loops.
    for spec in specs:
        chain = [spec.id]
        node = spec
        while node.checkpoint_from and node.checkpoint_from in seen:
            node = seen[node.checkpoint_from]
            if node.id in chain:
                cycle = " -> ".join([*chain[chain.index(node.id) :], node.id])
                if node.id == spec.id:
                    problems.append(
                        Problem(
                            spec.location.file,
                            spec.location.line,
                            spec.id,
                            f"checkpoint_from makes a cycle: {cycle}",
                        )
                    )
                break
            chain.append(node.id)
