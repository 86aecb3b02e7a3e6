"""What a run leaves on disk besides the result files: `job.json`, `SHA256SUMS`,
`summary.json`. Every file is written to a temporary name, synced and renamed, so a
reader never sees half of one. No URL signature or callback secret is ever written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .store import FileRow
from .urls import redact_tree


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_job_files(folder: Path, job_object: Mapping[str, Any], files: Iterable[FileRow]) -> None:
    """`job.json` (signatures removed) and `SHA256SUMS` (sha256sum -c format) of one job."""
    write_atomic(folder / "job.json", json.dumps(redact_tree(job_object), indent=2, sort_keys=True) + "\n")
    sums = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name) if f.done and f.sha256)
    write_atomic(folder / "SHA256SUMS", sums)


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
