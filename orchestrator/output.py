"""What a run leaves on disk besides the result files: `job.json`, `SHA256SUMS`,
`summary.json`. Every file is written to a temporary name, synced and renamed, so a
reader never sees half of one. No URL signature or callback secret is ever written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import OutputError
from .models import JobState
from .store import FileRow, JobRow
from .urls import redact_tree
from .verify import fsync_dir


def write_atomic(path: Path, text: str, *, sync_folder: bool = True) -> None:
    """Write to a temporary name, sync, rename. One process per campaign (the lock) writes here,
    so a fixed temporary name is safe, and cheaper than a random one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        if sync_folder:
            fsync_dir(path.parent)
    except OSError as exc:
        # The previous version, if any, is still whole under its name: nothing is lost.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        full = " (the disk is full: free some space and run again)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}{full}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_job_files(folder: Path, job_object: Mapping[str, Any], files: Iterable[FileRow]) -> None:
    """`job.json` (signatures removed) and `SHA256SUMS` (sha256sum -c format) of one job; then the
    folder is synced once, which makes the renames of its result files durable too."""
    write_atomic(
        folder / "job.json", json.dumps(redact_tree(job_object), indent=2, sort_keys=True) + "\n", sync_folder=False
    )
    sums = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name) if f.done and f.sha256)
    write_atomic(folder / "SHA256SUMS", sums)


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def campaign_record(campaign: str, rows: Sequence[JobRow], files: Mapping[str, Sequence[FileRow]]) -> dict[str, Any]:
    """The campaign as data: what `summary.json` holds and `status --json` prints."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    return {
        "campaign": campaign,
        "counts": counts,
        "done": bool(rows) and all(r.state is JobState.DONE for r in rows) and not any(r.duplicate_ids for r in rows),
        # jobs the service holds more than once under our tag (paid twice): job id -> the other remote ids
        "duplicates": {r.id: list(r.duplicate_ids) for r in rows if r.duplicate_ids},
        "jobs": [
            {
                "id": r.id,
                "type": r.type,
                "state": r.state.value,
                "remote_id": r.remote_id,
                "reason": r.reason,
                "percentage": r.percentage,
                "duplicate_remote_ids": list(r.duplicate_ids),
                # a lost answer: not looked for in the job list before this time (Unix seconds)
                "reconcile_after": r.reconcile_at if r.state is JobState.SUBMITTING else None,
                "files": [
                    {
                        "name": f.name,
                        "kind": f.kind.value,
                        "bytes": f.size_bytes,
                        "sha256": f.sha256,
                        "done": f.done,
                        "lost": f.lost,
                    }
                    for f in files.get(r.id, [])
                ],
            }
            for r in rows
        ],
    }
