"""Streaming one result file to disk without ever losing or corrupting it (rule 4).

Bytes go to `<name>.part`; a break resumes with `Range` (a server that ignores it
answers 200 and we start over); the whole file is checked against `size_bytes`,
the `x-goog-hash` md5 and, for `.safetensors`, its header; then it is synced and
renamed to its final name, and the folder is synced. A signed URL that expired or
is about to is renewed through the caller's `renew` (a GET of the job) before the
request, and once on a 400/403 mid-way; that costs no backoff. Only 200/206
bodies are ever written: an error page never lands in a result file.

This module talks to storage, not to the API: its session carries no API key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp
import anyio

from .config import Timeouts
from .errors import DownloadError, FileGone, UrlExpired, VerificationFailed
from .models import Artifact
from .urls import expires_at, redact

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
BACKOFF_S = 0.5
BACKOFF_MAX_S = 15.0
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class Fetched:
    path: Path
    size: int
    sha256: str


def _md5_from(headers: list[str]) -> str | None:
    for header in headers:
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            if name == "md5" and value:
                return value
    return None


def check_safetensors(path: Path, size: int) -> None:
    """The header of a .safetensors file parses and its tensors end where the file ends."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise VerificationFailed(f"{path.name}: too short to be safetensors")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 1024 * 1024):
            raise VerificationFailed(f"{path.name}: safetensors header length {length} is impossible")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VerificationFailed(f"{path.name}: safetensors header is not JSON") from exc
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if ends and 8 + length + max(ends) != size:
        raise VerificationFailed(f"{path.name}: tensors end at {8 + length + max(ends)}, file has {size} bytes")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Downloader:
    def __init__(self, *, timeouts: Timeouts | None = None, connections: int = 16) -> None:
        self._timeouts = timeouts or Timeouts()
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self.bytes_fetched = 0  # for progress and benchmarks

    async def __aenter__(self) -> Downloader:
        # A read timeout per chunk, never a total: a 6 GB checkpoint may take an hour.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._timeouts.connect_s, sock_read=self._timeouts.download_read_s
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=self._connections),
            auto_decompress=False,  # the bytes as stored; sizes and hashes are of those
            read_bufsize=CHUNK_BYTES,
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(
        self,
        artifact: Artifact,
        folder: Path,
        renew: Callable[[], Awaitable[Artifact]],
        *,
        attempts: int,
        renew_margin_s: float,
    ) -> Fetched:
        """Download `artifact` into `folder`, resuming, renewing and retrying as needed."""
        delay = BACKOFF_S
        renewed_for_error = False
        last: Exception | None = None
        for _ in range(attempts):
            deadline = expires_at(artifact.url)
            if deadline is not None and deadline - time.time() < renew_margin_s:
                artifact = await renew()
            try:
                return await self._once(artifact, folder)
            except UrlExpired as exc:
                if renewed_for_error:
                    raise
                log.info("download.url_renewed file=%s reason=%s", artifact.name, exc)
                artifact, renewed_for_error = await renew(), True
            except (FileGone, VerificationFailed):
                raise
            except DownloadError as exc:
                last = exc
                log.info("download.retry file=%s wait_s=%.1f error=%s", artifact.name, delay, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        raise DownloadError(f"{artifact.name}: gave up after {attempts} attempts: {last}")

    async def _once(self, artifact: Artifact, folder: Path) -> Fetched:
        assert self._session is not None, "use Downloader in `async with`"
        final = folder / artifact.name
        part = folder / (artifact.name + ".part")
        have = await anyio.to_thread.run_sync(_prepare, folder, part, artifact.size_bytes)
        headers = {"Range": f"bytes={have}-"} if have else {}
        where = redact(artifact.url)
        try:
            async with self._session.get(artifact.url, headers=headers) as resp:
                if resp.status == 416 and have and have == artifact.size_bytes:
                    pass  # the part is already whole
                elif resp.status in (400, 401, 403):
                    body = (await resp.text())[:300]
                    raise UrlExpired(f"{artifact.name}: storage answered {resp.status} ({_xml_code(body)})")
                elif resp.status == 404 or resp.status == 410:
                    raise FileGone(f"{artifact.name}: storage no longer has it ({where})")
                elif resp.status not in (200, 206):
                    raise DownloadError(f"{artifact.name}: storage answered HTTP {resp.status}")
                else:
                    start = self._start_of(resp, have, artifact)
                    md5 = _md5_from(resp.headers.getall("x-goog-hash", []))
                    writer = await self._stream(resp, part, start)
                    return await anyio.to_thread.run_sync(_verify_and_place, artifact, writer, final, md5)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"{artifact.name}: transfer broke ({type(exc).__name__}) from {where}") from exc
        # 416 on a whole part: hash what is there and place it.
        writer = await anyio.to_thread.run_sync(_PartWriter, part, have)
        await anyio.to_thread.run_sync(writer.close)
        return await anyio.to_thread.run_sync(_verify_and_place, artifact, writer, final, None)

    @staticmethod
    def _start_of(resp: aiohttp.ClientResponse, have: int, artifact: Artifact) -> int:
        """Where this body starts in the file: `have` on a good 206, else 0 (start over)."""
        if resp.status == 200:
            return 0
        match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != have:
            raise DownloadError(
                f"{artifact.name}: Content-Range {resp.headers.get('Content-Range')!r} does not resume at {have}"
            )
        total = match.group(3)
        if artifact.size_bytes is not None and total != "*" and int(total) != artifact.size_bytes:
            raise VerificationFailed(f"{artifact.name}: storage says {total} bytes, the job says {artifact.size_bytes}")
        return have

    async def _stream(self, resp: aiohttp.ClientResponse, part: Path, start: int) -> _PartWriter:
        """Append the body to `part` from `start`, hashing as it goes, off the event loop."""
        writer = await anyio.to_thread.run_sync(_PartWriter, part, start)
        try:
            buffer = bytearray()
            async for piece in resp.content.iter_chunked(CHUNK_BYTES):
                buffer += piece
                if len(buffer) >= CHUNK_BYTES:
                    await anyio.to_thread.run_sync(writer.write, bytes(buffer))
                    self.bytes_fetched += len(buffer)
                    buffer.clear()
            if buffer:
                await anyio.to_thread.run_sync(writer.write, bytes(buffer))
                self.bytes_fetched += len(buffer)
        finally:
            await anyio.to_thread.run_sync(writer.close)
        return writer


def _prepare(folder: Path, part: Path, size: int | None) -> int:
    """Make the folder, check free space; how many bytes of the part can be resumed."""
    folder.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        have = 0  # a part longer than the file is not ours to trust
    needed = (size or 0) - have
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    if needed > 0 and free < needed + FREE_SPACE_MARGIN_BYTES:
        raise VerificationFailed(
            f"not enough free space in {folder}: {part.name} needs {needed / 1e6:.0f} MB, {free / 1e6:.0f} MB free"
        )
    return have


def _xml_code(body: str) -> str:
    match = re.search(r"<Code>([^<]+)</Code>", body)
    return match.group(1) if match else "no error code"


class _PartWriter:
    """A .part file opened at `start`, with sha256 and md5 of everything before and after it.

    Resuming hashes the bytes already there once; new bytes are hashed as they are
    written, so a finished download is never read again.
    """

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.sha, self.md5 = hashlib.sha256(), hashlib.md5()
        self.size = 0
        self._fh = path.open("r+b" if start and path.exists() else "wb")
        while self.size < start and (chunk := self._fh.read(min(CHUNK_BYTES * 4, start - self.size))):
            self._hash(chunk)
        self._fh.seek(self.size)
        self._fh.truncate()

    def _hash(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.md5.update(chunk)
        self.size += len(chunk)

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self._hash(chunk)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


def _verify_and_place(artifact: Artifact, writer: _PartWriter, final: Path, md5: str | None) -> Fetched:
    """Check the synced part file, rename it into place, sync the folder."""
    part, size = writer.path, writer.size
    if artifact.size_bytes is not None and size != artifact.size_bytes:
        if size < artifact.size_bytes:
            raise DownloadError(f"{artifact.name}: got {size} of {artifact.size_bytes} bytes")
        part.unlink()
        raise VerificationFailed(f"{artifact.name}: {size} bytes, expected {artifact.size_bytes}")
    if md5 is not None and base64.b64encode(writer.md5.digest()).decode() != md5:
        part.unlink()  # the bytes are wrong: start over rather than resume on them
        raise DownloadError(f"{artifact.name}: md5 does not match storage's x-goog-hash; fetching again")
    if final.suffix == ".safetensors":
        try:
            check_safetensors(part, size)
        except VerificationFailed:
            part.unlink()
            raise
    os.replace(part, final)
    _fsync_dir(final.parent)
    return Fetched(final, size, writer.sha.hexdigest())
