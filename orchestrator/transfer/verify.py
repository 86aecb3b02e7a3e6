"""Checking a downloaded file and putting it in place (rule 4): nothing unverified ever
stands under a final name.

`PartWriter` hashes bytes as they are written (sha256 for SHA256SUMS, md5 to compare
with storage's `x-goog-hash`); `place` checks size, md5 and the safetensors header,
syncs, renames and syncs the folder.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..crashpoints import crash_point
from ..errors import DownloadError, NoSpace, VerificationFailed

READ_BYTES = 1024 * 1024
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    path: Path
    size: int
    sha256: str


class Hashes:
    """sha256 always (for SHA256SUMS); md5 only when storage gave one to compare with."""

    def __init__(self, *, md5: bool) -> None:
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5() if md5 else None
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self.sha.update(chunk)
        if self.md5 is not None:
            self.md5.update(chunk)
        self.size += len(chunk)

    def md5_b64(self) -> str | None:
        return base64.b64encode(self.md5.digest()).decode() if self.md5 is not None else None


def write_at(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    """All of `data` at `offset`; a full disk is `NoSpace` (the bytes before it stay good)."""
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise NoSpace(f"the disk is full ({exc.strerror})") from exc
        raise


class PartWriter:
    """A .part file written from `start` on, hashed as it goes (the bytes before `start`
    are hashed once, from disk, when resuming; whatever follows them is cut off)."""

    def __init__(self, path: Path, start: int, *, md5: bool) -> None:
        self.path = path
        self.hashes = Hashes(md5=md5)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        while self.hashes.size < start:
            chunk = os.pread(self._fd, min(READ_BYTES, start - self.hashes.size), self.hashes.size)
            if not chunk:
                os.close(self._fd)
                raise DownloadError(f"{path.name} ends at {self.hashes.size}, before the {start} bytes proven")
            self.hashes.update(chunk)
        os.ftruncate(self._fd, start)

    @property
    def position(self) -> int:
        """Bytes in the file, all written and hashed (synced only after `sync` or `close`)."""
        return self.hashes.size

    def write(self, chunk: bytes | bytearray) -> None:
        assert self._fd is not None, "write after close"
        write_at(self._fd, self.hashes.size, chunk)
        self.hashes.update(chunk)

    def sync(self) -> None:
        assert self._fd is not None, "sync after close"
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def check_safetensors(path: Path, size: int) -> None:
    """The header of a .safetensors file parses and its tensors end where the file ends."""
    with path.open("rb") as fh:
        length = _header_length(path.name, fh.read(8), size)
        _check_header(path.name, length, fh.read(length), size)


def check_safetensors_head(name: str, head: bytes, size: int) -> None:
    """The same check on the first bytes of a file of `size` bytes (a bucket upload's first
    part): they must hold the whole header."""
    length = _header_length(name, head[:8], size)
    if len(head) < 8 + length:
        raise VerificationFailed(f"{name}: the safetensors header ({length} bytes) does not fit in its first part")
    _check_header(name, length, head[8 : 8 + length], size)


def _header_length(name: str, first8: bytes, size: int) -> int:
    if len(first8) < 8:
        raise VerificationFailed(f"{name}: too short to be safetensors")
    (length,) = struct.unpack("<Q", first8)
    if length > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise VerificationFailed(f"{name}: safetensors header length {length} is impossible")
    return int(length)


def _check_header(name: str, length: int, header_bytes: bytes, size: int) -> None:
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationFailed(f"{name}: the safetensors header is not JSON") from exc
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if ends and 8 + length + max(ends) != size:
        raise VerificationFailed(f"{name}: tensors end at {8 + length + max(ends)}, the file has {size} bytes")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(part: Path, final: Path, hashes: Hashes, *, size_bytes: int | None, md5: str | None) -> Fetched:
    """Check the synced `part`, then rename it to `final` and sync the folder.

    A wrong file is deleted (its bytes are not worth resuming on); a short one is kept
    for the next attempt to resume.
    """
    size = hashes.size
    if size_bytes is not None and size != size_bytes:
        if size < size_bytes:
            raise DownloadError(f"{final.name}: got {size} of {size_bytes} bytes")
        part.unlink()
        raise VerificationFailed(f"{final.name}: {size} bytes, the job says {size_bytes}")
    if md5 is not None and hashes.md5_b64() not in (None, md5):
        part.unlink()
        raise DownloadError(f"{final.name}: md5 does not match storage's x-goog-hash; fetching it again")
    if final.suffix == ".safetensors":
        try:
            check_safetensors(part, size)
        except VerificationFailed:
            part.unlink()
            raise
    crash_point("before-rename")
    os.replace(part, final)  # the folder is synced once per job, when its files are all placed
    return Fetched(final, size, hashes.sha.hexdigest())
