"""The `jobs` commands: the API's jobs outside any campaign. `jobs list TYPE` and `jobs get
TYPE ID` are thin views (a job that does not exist is `NoSuchJob`, exit 1, not the key's 3);
`jobs download TYPE ID [--out DIR]` fetches one job's files.

For a download, the job is read with the API client and every file it offers is fetched
with the run's own `Downloader` (resumed after a break, its URL renewed by a GET of the
job, size, md5 and format checked, sha256 of every byte, renamed only when whole), into DIR
(default: the folder `ID` in the current one), with `job.json` (signatures removed) and
`SHA256SUMS` beside them, as a run writes them. A file already there that matches its `SHA256SUMS` line
is kept, not fetched again. No state store is involved: what a partial file has proven is
kept in memory only, so a download stopped halfway starts that file over next time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from . import output
from .api.client import ApiClient
from .api.jobs import parse_job, safe_name
from .commands import read_api_key
from .config import RunSettings
from .errors import (
    ApiError,
    AuthError,
    DownloadError,
    DreamlookBatchError,
    FileGone,
    NoSuchJob,
    NotFound,
    QuotaError,
    TransportError,
    UsageError,
)
from .models import Artifact, JobType, RemoteState
from .run import preflight
from .store import FileRow
from .store.parts import MemoryPartLog
from .transfer.bucket import is_bucket_url
from .transfer.file import Downloader
from .transfer.urls import redact
from .ui import human_bytes

SUMS = "SHA256SUMS"


@dataclass(frozen=True, slots=True)
class Downloaded:
    """What `jobs download` left: the folder, the files in it (verified), and those it could not fetch."""

    folder: Path
    files: tuple[FileRow, ...]
    failed: tuple[str, ...]


async def api_view(
    api_url: str, key_file: Path | None, job_type: JobType, job_id: str | None, limit: int | None
) -> Any:
    preflight.check_api_url(api_url)
    async with ApiClient(api_url, read_api_key(key_file)) as api:
        if job_id is not None:
            return await get_one_job(api, job_type, job_id)
        return await api.list_jobs(job_type, limit=limit)


async def get_one_job(api: ApiClient, job_type: JobType, job_id: str) -> dict[str, Any]:
    """`jobs get`/`jobs download`: the job object; a 404 said as "no such job" (exit 1, not the
    key's exit 3)."""
    try:
        return await api.get_job(job_type, job_id)
    except NotFound as exc:
        raise NoSuchJob(
            f"no such {job_type} job {job_id} at {redact(api.base_url)} (the API answered 404); "
            f"`dreamlook-batch jobs list {job_type}` lists the newest"
        ) from exc


def default_folder(job_id: str) -> Path:
    """`--out` left out: a folder named after the job, in the current folder (made safe: the id is typed)."""
    return Path.cwd() / safe_name(job_id, "job")


async def download_job(
    api_url: str,
    key_file: Path | None,
    job_type: JobType,
    job_id: str,
    out: str | None,
    say: Callable[[str], None],
    *,
    settings: RunSettings | None = None,
) -> Downloaded:
    """Fetch every file the job offers into `out`; `say` is told of each file as it is placed."""
    settings = settings or RunSettings()
    if out is not None and is_bucket_url(out):
        raise UsageError(f"--out {out}: jobs download writes to a local folder; give a path")
    folder = (Path(out) if out else default_folder(job_id)).resolve()
    preflight.check_api_url(api_url)
    async with ApiClient(api_url, read_api_key(key_file), timeouts=settings.timeouts) as api:
        raw = await get_one_job(api, job_type, job_id)
        remote = parse_job(raw)
        if remote.state is not RemoteState.SUCCESS:
            if remote.state is RemoteState.FAILURE:
                why = f" ({remote.failure_reason})" if remote.failure_reason else ""
                raise DreamlookBatchError(f"{job_type} job {job_id} failed{why}: it made no files")
            raise DreamlookBatchError(
                f"{job_type} job {job_id} is {remote.raw_state or 'in an unknown state'}: "
                "nothing to download until it succeeds"
            )
        if not remote.artifacts:
            raise DreamlookBatchError(f"{job_type} job {job_id} succeeded but offers no files")
        preflight.check_output(folder)  # made, and a probe file written: before any byte is fetched
        sums = await anyio.to_thread.run_sync(_read_sums, folder / SUMS)

        async def renew(remote_id: str, name: str) -> Artifact:
            fresh = parse_job(await get_one_job(api, job_type, job_id))
            found = next((a for a in fresh.artifacts if a.remote_id == remote_id), None)
            if found is None or not found.available:
                raise FileGone(f"{name}: the service no longer offers it")
            return found

        placed: list[FileRow] = []
        failed: list[str] = []
        async with Downloader.for_settings(settings) as downloader:
            for artifact in remote.artifacts:
                row = FileRow.wanted(job_id, artifact)
                kept = await anyio.to_thread.run_sync(_already_here, folder / artifact.name, sums, artifact)
                if kept is not None:
                    placed.append(_done(row, *kept))
                    say(f"{artifact.name}: already here, {human_bytes(kept[1])}, sha256 {kept[0]} checked")
                    continue
                if not artifact.available:
                    failed.append(artifact.name)
                    say(f"{artifact.name}: not fetched: the service no longer offers it")
                    continue
                try:
                    got = await downloader.fetch(
                        artifact,
                        folder,
                        partial(renew, artifact.remote_id, artifact.name),
                        MemoryPartLog(),
                        renew_margin_s=settings.url_renew_margin_s,
                    )
                except (AuthError, QuotaError):
                    raise  # the key: nothing more can be fetched (exit 3)
                except (DownloadError, ApiError, TransportError, OSError) as exc:  # renewing a URL can fail too
                    failed.append(artifact.name)
                    say(f"{artifact.name}: not fetched: {exc}")
                    continue
                placed.append(_done(row, got.sha256, got.size))
                say(f"{artifact.name}: {human_bytes(got.size)}, sha256 {got.sha256}, verified")
    await output.write_job_files(folder, *output.job_files(raw, placed))
    return Downloaded(folder, tuple(placed), tuple(failed))


def _done(row: FileRow, sha256: str, size: int) -> FileRow:
    return replace(row, sha256=sha256, size_bytes=size, done=True)


def _read_sums(path: Path) -> dict[str, str]:
    """An earlier download's `SHA256SUMS` (name -> sha256); none, or unreadable: nothing is kept."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    pairs = (line.split("  ", 1) for line in text.splitlines() if "  " in line)
    return {name: digest for digest, name in pairs}


def _already_here(path: Path, sums: dict[str, str], artifact: Artifact) -> tuple[str, int] | None:
    """(sha256, size) of a file an earlier download placed, if its bytes still match its
    `SHA256SUMS` line and the job's size: then it is not fetched again."""
    wanted = sums.get(artifact.name)
    if wanted is None:
        return None
    try:
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        size = path.stat().st_size
    except OSError:
        return None
    if digest != wanted or (artifact.size_bytes is not None and size != artifact.size_bytes):
        return None
    return digest, size


__all__ = ["Downloaded", "api_view", "default_folder", "download_job", "get_one_job"]
