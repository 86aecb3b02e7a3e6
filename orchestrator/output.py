"""What a run leaves besides the result files: `job.json`, `SHA256SUMS`, `summary.json`.
On disk every file is written to a temporary name and renamed, so a reader never sees half
of one; into a bucket, each is one PUT. `summary.json` is synced before its rename. A job's
`job.json` and `SHA256SUMS` are not (their folder is synced once, for them and the job's
result files): the store keeps what they hold, and a run that starts writes them again
where a crash (or a person) lost or changed them. No URL signature or callback secret is
ever written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import anyio

from .errors import OutputError
from .models import UNPAID, JobState
from .store import FileRow, JobRow, Store
from .transfer.bucket import Bucket
from .transfer.urls import redact_tree
from .transfer.verify import fsync_dir

# Jobs read from the store at once while summary.json or `status --json` is written: what the
# end of a run holds, whatever the campaign's size.
SUMMARY_PAGE_JOBS = 500
WRITE_BATCH_CHARS = 256 * 1024  # chunks of summary.json handed to the writer thread at once
# What a job removed from the manifest after it reached the service is marked with, wherever it
# is listed: it was (or may have been) paid for, so it is still followed and fetched.
NOT_IN_MANIFEST = "not in the manifest any more"
JOB_JSON, SHA256SUMS = "job.json", "SHA256SUMS"
FINISHED_WITH_FILES = (JobState.DONE, JobState.LOST)  # their job.json and SHA256SUMS are written
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"


async def write_atomic(path: Path, text: str, *, sync_folder: bool = True) -> None:
    """Write to a temporary name, sync, rename (the report, where one piece is enough)."""

    async def one_piece() -> AsyncIterator[str]:
        yield text

    await write_atomic_stream(path, one_piece(), sync_folder=sync_folder)


async def write_atomic_stream(path: Path, chunks: AsyncIterable[str], *, sync_folder: bool = True) -> None:
    """Write text that comes in chunks (from the store, a page at a time) to a temporary name,
    sync, rename: each chunk is written as it comes, so a file as large as the campaign is never
    whole in memory. One process per campaign (the lock) writes here, so a temporary name of
    the process is safe, and cheaper than a random one."""
    tmp = _temporary(path)
    try:
        await aiofiles.os.makedirs(path.parent, exist_ok=True)
        async with aiofiles.open(tmp, "w", encoding="utf-8") as fh:
            batch: list[str] = []
            size = 0
            async for chunk in chunks:
                batch.append(chunk)
                size += len(chunk)
                if size >= WRITE_BATCH_CHARS:  # one thread hop per batch, not per job
                    await fh.write("".join(batch))
                    batch, size = [], 0
            await fh.write("".join(batch))
            await fh.flush()
            await anyio.to_thread.run_sync(os.fsync, fh.fileno())
        await aiofiles.os.replace(tmp, path)
        if sync_folder:
            await anyio.to_thread.run_sync(fsync_dir, path.parent)
    except BaseException as exc:
        raise _failed(path, tmp, exc) from exc


def _temporary(path: Path) -> Path:
    # Of this process: workers of one campaign sharing the folder never write one temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _failed(path: Path, tmp: Path, exc: BaseException) -> BaseException:
    """The temporary file removed; an OSError said as an `OutputError`. The previous version,
    if any, is still whole under its name: nothing is lost."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
    if not isinstance(exc, OSError):
        return exc  # e.g. the store failed while the chunks were read from it
    full = " (the disk is full: free some space and run again)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return OutputError(f"cannot write {path}: {exc.strerror or exc}{full}")


def job_files(job_object: Mapping[str, Any], files: Iterable[FileRow]) -> tuple[str, str]:
    """The texts of one job's `job.json` (signatures removed) and `SHA256SUMS` (sha256sum -c format)."""
    return json.dumps(redact_tree(job_object), indent=2, sort_keys=True) + "\n", sums_text(files)


def sums_text(files: Iterable[FileRow]) -> str:
    """`SHA256SUMS` of a job's files (sha256sum -c format): those placed, by name."""
    return "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name) if f.done and f.sha256)


async def write_job_files(folder: Path, job_json: str, sums: str) -> None:
    """`job.json` and `SHA256SUMS` of one job, each renamed into place unsynced; then the folder
    is synced once, which makes the renames of its result files durable too. The store keeps
    both texts (restore_job_files writes them again if a crash loses them)."""
    await aiofiles.os.makedirs(folder, exist_ok=True)
    await _write_unsynced(folder / JOB_JSON, job_json)
    await _write_unsynced(folder / SHA256SUMS, sums)
    await _sync_folder(folder)


async def _sync_folder(folder: Path) -> None:
    try:
        await anyio.to_thread.run_sync(fsync_dir, folder)
    except OSError as exc:
        raise OutputError(f"cannot sync the folder {folder}: {exc.strerror or exc}") from exc


async def _write_unsynced(path: Path, text: str) -> None:
    tmp = _temporary(path)
    try:
        async with aiofiles.open(tmp, "w", encoding="utf-8") as fh:
            await fh.write(text)
        await aiofiles.os.replace(tmp, path)
    except BaseException as exc:
        raise _failed(path, tmp, exc) from exc


async def restore_job_files(store: Store, out_dir: Path, *, page_size: int = SUMMARY_PAGE_JOBS) -> list[str]:
    """Every finished job's `job.json` and `SHA256SUMS` checked against the store, and written
    again where missing or different (a crash after their unsynced rename, an edit). Only in
    folders that are there (a person who removed a job's folder wanted it gone), and `job.json`
    only where the store kept its text (jobs finished before schema 4 have none). No API call.
    The ids of the jobs whose files were written again."""
    if not await store.count(FINISHED_WITH_FILES):
        return []
    restored: list[str] = []
    async for page in _all_pages(store, page_size):
        finished = [(row.id, files) for row, files in page if row.state in FINISHED_WITH_FILES]
        if not finished:
            continue
        kept = await store.job_objects([job_id for job_id, _ in finished])
        wanted = {job_id: {JOB_JSON: kept.get(job_id), SHA256SUMS: sums_text(files)} for job_id, files in finished}
        stale = await anyio.to_thread.run_sync(_stale, out_dir, wanted)  # one hop for a page's reads
        for job_id, names in stale.items():
            for name in names:
                text = wanted[job_id][name]
                assert text is not None  # _stale names only files the store has a text for
                await _write_unsynced(out_dir / job_id / name, text)
            await _sync_folder(out_dir / job_id)
            restored.append(job_id)
    return restored


async def _all_pages(store: Store, page_size: int) -> AsyncIterator[list[tuple[JobRow, list[FileRow]]]]:
    """The manifest's jobs, then those removed from it after they reached the service."""
    async for page in store.manifest_pages(page_size):
        yield page
    async for page in removed_pages(store, page_size):
        yield page


def _stale(out_dir: Path, wanted: Mapping[str, Mapping[str, str | None]]) -> dict[str, list[str]]:
    """Of each job's files, those (in a folder that is there) whose bytes are not the store's text."""
    stale: dict[str, list[str]] = {}
    for job_id, texts in wanted.items():
        folder = out_dir / job_id
        if not folder.is_dir():
            continue
        for name, text in texts.items():
            if text is None:
                continue
            try:
                same = (folder / name).read_bytes() == text.encode()
            except OSError:  # missing, or not a file one can read: written again (or said why not)
                same = False
            if not same:
                stale.setdefault(job_id, []).append(name)
    return stale


async def put_job_files(bucket: Bucket, job_id: str, job_json: str, sums: str) -> None:
    """The same two files into the bucket, beside the job's results (a PUT is atomic and durable)."""
    await bucket.put(bucket.url.key(job_id, "job.json"), job_json.encode(), content_type=JSON_TYPE)
    await bucket.put(bucket.url.key(job_id, "SHA256SUMS"), sums.encode(), content_type=TEXT_TYPE)


async def put_summary(bucket: Bucket, campaign: str, store: Store, *, manifest: str) -> None:
    """`summary.json` into the bucket: made in memory (a PUT needs its length; a campaign of
    10,000 jobs makes a few MB)."""
    chunks = [c async for c in campaign_record_json(campaign, store, extra={"manifest": manifest})]
    await bucket.put(bucket.url.key("summary.json"), "".join(chunks).encode(), content_type=JSON_TYPE)


async def write_summary(
    path: Path, campaign: str, store: Store, *, manifest: str, page_size: int = SUMMARY_PAGE_JOBS
) -> None:
    """`summary.json`: the campaign record and the manifest's path, streamed from the store."""
    record = campaign_record_json(campaign, store, extra={"manifest": manifest}, page_size=page_size)
    await write_atomic_stream(path, record)


async def campaign_record_json(
    campaign: str, store: Store, *, extra: Mapping[str, Any] | None = None, page_size: int = SUMMARY_PAGE_JOBS
) -> AsyncIterator[str]:
    """The campaign as data, as JSON text: what `summary.json` holds and `status --json` prints.

    The text is what `json.dumps(record, indent=2, sort_keys=True) + "\n"` would give, made a job
    at a time: counts and duplicates come from the store's own tallies and the jobs a page at a
    time, so memory does not grow with the campaign (100,000 jobs held at once cost ~250 MB).
    """
    counts = {state.value: n for state, n in (await store.counts()).items() if n}
    duplicates = {job_id: list(others) for job_id, others in (await store.duplicates()).items() if others}
    removed = await removed_counts(store, page_size=page_size)
    total = sum(counts.values())
    head: dict[str, Any] = {
        "campaign": campaign,
        "counts": counts,
        "done": total > 0
        and counts.get(JobState.DONE.value, 0) == total
        and not duplicates
        and all(state.terminal and state is not JobState.UNKNOWN for state in removed),
        # jobs the service holds more than once under our tag (paid twice): job id -> the other remote ids
        "duplicates": duplicates,
        **(extra or {}),
    }
    if removed:  # counted apart from the manifest's jobs; listed after them, each marked
        head["not_in_manifest"] = {state.value: n for state, n in removed.items()}
    async for chunk in _json_chunks(head, "jobs", _job_records(store, page_size)):
        yield chunk


def kept_after_removal(row: JobRow) -> bool:
    """A job no longer in the manifest that reached the service: still followed, fetched and listed.
    One that never did (or was refused, 422) cost nothing and is dropped as the manifest says."""
    return not row.in_manifest and row.state not in UNPAID


async def removed_pages(
    store: Store, page_size: int = SUMMARY_PAGE_JOBS
) -> AsyncIterator[list[tuple[JobRow, list[FileRow]]]]:
    """The jobs removed from the manifest after they reached the service, with their files, a page at a time."""
    async for page in store.manifest_pages(page_size, removed=True):
        kept = [(row, files) for row, files in page if kept_after_removal(row)]
        if kept:
            yield kept


async def removed_counts(store: Store, *, page_size: int = SUMMARY_PAGE_JOBS) -> dict[JobState, int]:
    """How many jobs removed from the manifest after they reached the service are in each state."""
    counts: dict[JobState, int] = {}
    async for page in removed_pages(store, page_size):
        for row, _ in page:
            counts[row.state] = counts.get(row.state, 0) + 1
    return counts


async def _job_records(store: Store, page_size: int) -> AsyncIterator[dict[str, Any]]:
    """The manifest's jobs in its order, then the ones removed from it that reached the service."""
    async for page in store.manifest_pages(page_size):
        for row, files in page:
            yield _job_record(row, files)
    async for page in removed_pages(store, page_size):
        for row, files in page:
            yield {**_job_record(row, files), "in_manifest": False, "note": NOT_IN_MANIFEST}


def _job_record(row: JobRow, files: Sequence[FileRow]) -> dict[str, Any]:
    return {
        "id": row.id,
        "type": row.type,
        "state": row.state.value,
        "remote_id": row.remote_id,
        "reason": row.reason,
        "percentage": row.percentage,
        "duplicate_remote_ids": list(row.duplicate_ids),
        # a lost answer: not looked for in the job list before this time (Unix seconds)
        "reconcile_after": row.reconcile_at if row.state is JobState.SUBMITTING else None,
        "files": [
            {
                "name": f.name,
                "kind": f.kind.value,
                "bytes": f.size_bytes,
                "sha256": f.sha256,
                "done": f.done,
                "lost": f.lost,
            }
            for f in files
        ],
    }


async def _json_chunks(head: Mapping[str, Any], list_key: str, items: AsyncIterable[Any]) -> AsyncIterator[str]:
    """`json.dumps({**head, list_key: list(items)}, indent=2, sort_keys=True) + "\n"`, an item at a time.

    A value nested at depth d is its own `json.dumps(indent=2)` with every line break followed by
    2 * d more spaces: JSON text holds no raw line break of its own (one in a string is `\n`)."""

    def nested(value: Any, depth: int) -> str:
        return json.dumps(value, indent=2, sort_keys=True).replace("\n", "\n" + "  " * depth)

    for i, key in enumerate(sorted([*head, list_key])):
        yield ("{" if i == 0 else ",") + "\n  " + json.dumps(key) + ": "
        if key != list_key:
            yield nested(head[key], 1)
            continue
        empty = True
        async for item in items:
            yield ("[" if empty else ",") + "\n    " + nested(item, 2)
            empty = False
        yield "[]" if empty else "\n  ]"
    yield "\n}\n"
