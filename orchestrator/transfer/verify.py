"""Checking a downloaded file and putting it in place (rule 4): nothing unverified ever
stands under a final name.

`Hashes` are of the bytes as they are written (sha256 for SHA256SUMS, md5 and crc32c to
compare with storage's `x-goog-hash`); `place` checks size, those hashes and the safetensors
header, then renames.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import os
import struct
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import aiofiles.os
import google_crc32c

from ..crashpoints import crash_point
from ..errors import DownloadError, VerificationFailed

READ_BYTES = 1024 * 1024
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# google-crc32c's C extension (hardware CRC32C); the library ships no type hints.
crc32c_extend = cast(Callable[[int, bytes], int], google_crc32c.extend)


@dataclass(frozen=True, slots=True)
class StorageHashes:
    """Storage's hashes of the whole object (`x-goog-hash`), base64 as GCS sends them: md5 for
    an object uploaded whole, crc32c for every object (a composite one has only that)."""

    md5: str | None = None
    crc32c: str | None = None


@dataclass(frozen=True, slots=True)
class Fetched:
    path: Path
    size: int
    sha256: str


class Hashes:
    """sha256 always (for SHA256SUMS); md5 and crc32c only when storage gave one to compare with."""

    def __init__(self, *, md5: bool, crc32c: bool = False) -> None:
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5() if md5 else None
        self.crc32c: int | None = 0 if crc32c else None
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._sha_and_crc(chunk)
        if self.md5 is not None:
            self.md5.update(chunk)
        self.size += len(chunk)

    async def update_beside(self, chunk: memoryview, pool: Executor) -> None:
        """`update` on `pool`, sha256 and md5 in threads of their own (md5 is the slower)."""
        loop = asyncio.get_running_loop()
        sha = loop.run_in_executor(pool, self._sha_and_crc, chunk)
        if self.md5 is not None:
            await loop.run_in_executor(pool, self.md5.update, chunk)
        await sha
        self.size += len(chunk)

    def _sha_and_crc(self, chunk: bytes | bytearray | memoryview) -> None:
        self.sha.update(chunk)
        if self.crc32c is not None:
            self.crc32c = crc32c_extend(self.crc32c, bytes(chunk))  # bytes only; a copy costs far less than the hash

    def md5_b64(self) -> str | None:
        return base64.b64encode(self.md5.digest()).decode() if self.md5 is not None else None

    def crc32c_b64(self) -> str | None:
        return base64.b64encode(self.crc32c.to_bytes(4, "big")).decode() if self.crc32c is not None else None

    def mismatch(self, expected: StorageHashes) -> str | None:
        """Which of storage's hashes of the whole object these bytes fail, if any."""
        if expected.md5 is not None and self.md5_b64() not in (None, expected.md5):
            return "md5"
        if expected.crc32c is not None and self.crc32c_b64() not in (None, expected.crc32c):
            return "crc32c"
        return None


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


async def place(
    part: Path, final: Path, hashes: Hashes, *, size_bytes: int | None, expected: StorageHashes, pool: Executor
) -> Fetched:
    """Check the synced `part`, then rename it to `final` (the folder is synced once per job,
    when its files are all placed).

    A wrong file is deleted (its bytes are not worth resuming on); a short one is kept
    for the next attempt to resume.
    """
    size = hashes.size
    if size_bytes is not None and size != size_bytes:
        if size < size_bytes:
            raise DownloadError(f"{final.name}: got {size} of {size_bytes} bytes")
        await aiofiles.os.remove(part, executor=pool)
        raise VerificationFailed(f"{final.name}: {size} bytes, the job says {size_bytes}")
    failed = hashes.mismatch(expected)
    if failed is not None:
        await aiofiles.os.remove(part, executor=pool)
        raise DownloadError(f"{final.name}: {failed} does not match storage's x-goog-hash; fetching it again")
    if final.suffix == ".safetensors":
        try:
            await asyncio.get_running_loop().run_in_executor(pool, check_safetensors, part, size)
        except VerificationFailed:
            await aiofiles.os.remove(part, executor=pool)
            raise
    crash_point("before-rename")
    await aiofiles.os.replace(part, final, executor=pool)
    return Fetched(final, size, hashes.sha.hexdigest())
