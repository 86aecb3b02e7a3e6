"""The bytes of every simulated file, computed from its key, never stored.

A checkpoint is a valid safetensors file (8-byte header length, a JSON header,
then one U8 tensor) whose tensor bytes repeat a pseudo-random pattern of
``PATTERN_BYTES`` (not a power of two, so a resume at a wrong offset changes the
hash). Images are real PNGs. Tests call :func:`expected_sha256` to know what a
downloaded file must hash to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import google_crc32c

_extend = cast(Callable[[int, bytes], int], google_crc32c.extend)  # the library ships no type hints

PATTERN_BYTES = 1024 * 1024 + 7
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FileContent:
    """One file's content: `key` seeds the bytes, `size` is exact."""

    key: str
    size: int
    safetensors: bool
    corrupt_header: bool = False  # a header that is not JSON (a broken upload), of the same length

    def read(self, start: int, end: int) -> Iterator[memoryview]:
        """Yield the bytes in [start, end) in chunks of at most CHUNK_BYTES."""
        header = _safetensors_header(self.key, self.size) if self.safetensors else b""
        if self.corrupt_header:
            header = header[:8] + b"\x00" * (len(header) - 8)
        pos = start
        if pos < len(header):
            upto = min(end, len(header))
            yield memoryview(header)[pos:upto]
            pos = upto
        body_len = self.size - len(header)
        doubled = _pattern(self.key, min(PATTERN_BYTES, max(body_len, 1)))
        period = len(doubled) // 2
        view = memoryview(doubled)
        while pos < end:
            off = (pos - len(header)) % period
            n = min(end - pos, CHUNK_BYTES, period)
            yield view[off : off + n]
            pos += n


@lru_cache(maxsize=32)
def _pattern(key: str, period: int) -> bytes:
    one = hashlib.shake_256(key.encode()).digest(period)
    return one + one


@lru_cache(maxsize=1024)
def _safetensors_header(key: str, size: int) -> bytes:
    """Header sized so the tensor fills the rest of the file exactly."""
    data_len = size
    for _ in range(8):  # converges in two rounds: the digits of data_len settle
        meta = {
            "__metadata__": {"format": "pt", "source": "dreamlook-sim", "key": key},
            "weight": {"dtype": "U8", "shape": [data_len], "data_offsets": [0, data_len]},
        }
        raw = json.dumps(meta, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        new_len = size - 8 - len(raw)
        if new_len == data_len:
            return struct.pack("<Q", len(raw)) + raw
        data_len = new_len
    raise ValueError(f"file of {size} bytes is too small for a safetensors header")


def expected_sha256(content: FileContent) -> str:
    digest = hashlib.sha256()
    for chunk in content.read(0, content.size):
        digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=4096)
def md5_b64(content: FileContent) -> str:
    digest = hashlib.md5()
    for chunk in content.read(0, content.size):
        digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


@lru_cache(maxsize=4096)
def crc32c_b64(content: FileContent) -> str:
    crc = 0
    for chunk in content.read(0, content.size):
        crc = _extend(crc, bytes(chunk))
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def crc32c_b64_bytes(data: bytes) -> str:
    return base64.b64encode(_extend(0, data).to_bytes(4, "big")).decode()


def md5_b64_bytes(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


@lru_cache(maxsize=256)
def png_image(key: str, width: int, height: int) -> bytes:
    """A real RGB PNG: one seeded row of colour, rotated a little on each line."""
    row_len = width * 3
    tile = hashlib.shake_256(key.encode()).digest(row_len)
    step = 3 * (1 + tile[0] % 7)
    rows = bytearray()
    for y in range(height):
        shift = (y * step) % row_len
        rows += b"\x00" + tile[shift:] + tile[:shift]

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + chunk(b"IEND", b"")
    )
