"""Fetching one result file to disk without ever losing or corrupting it (rule 4).

Small files go in one stream to `<name>.part`, resumed with `Range` after a break
(a server that ignores `Range` answers 200 and we start over; an object whose ETag
changed is started over too). Files of `parallel_min_bytes` or more go over several
connections on fixed ranges (`ranged.py`). Either way `verify.place` checks size,
md5 and format before the rename. A signed URL that has expired, or will within the
margin, is renewed through the caller's `renew` (a GET of the job) before a request,
and on a 400/403 mid-way; renewals cost no backoff. Only 200/206 bodies are written.

This module talks to storage, never to the API: its session carries no API key.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import aiohttp
import anyio

from .config import CONNECTIONS_PER_FILE, PARALLEL_MIN_BYTES, RANGE_BYTES, Timeouts
from .errors import DownloadError, FileGone, UrlExpired, VerificationFailed
from .models import Artifact
from .ranged import ObjectChanged, PartLog, RangesIgnored, fetch_ranges
from .urls import expires_at, redact
from .verify import CONTENT_RANGE, Fetched, Hashes, PartWriter, place, storage_md5

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK_BYTES = 1024 * 1024  # bytes handed to the writer thread at once
READ_BUFFER_BYTES = 256 * 1024  # aiohttp's buffer per connection
IO_THREADS = 4  # file writes and hashes of all downloads; more threads only add malloc arenas (RSS)
BACKOFF_S = 0.5
BACKOFF_MAX_S = 15.0
MAX_RENEWALS = 3  # per attempt cycle: a URL refused right after renewal is not a URL problem
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024


@dataclass
class Transfer:
    """One file being fetched, for progress displays."""

    name: str
    total: int | None
    started: float = field(default_factory=time.monotonic)
    counter: list[int] = field(default_factory=lambda: [0])  # bytes so far (shared with ranged.py)

    @property
    def done(self) -> int:
        return self.counter[0]


class _Source:
    """The artifact being fetched, with its URL renewed at most once per staleness."""

    def __init__(self, artifact: Artifact, renew: Callable[[], Awaitable[Artifact]]) -> None:
        self.artifact = artifact
        self._renew = renew
        self._lock = anyio.Lock()
        self.renewals = 0

    @property
    def url(self) -> str:
        return self.artifact.url

    async def renew_after(self, stale_url: str) -> None:
        async with self._lock:
            if self.artifact.url != stale_url:
                return  # another connection renewed it meanwhile
            self.renewals += 1
            if self.renewals > MAX_RENEWALS:
                raise DownloadError(f"{self.artifact.name}: storage keeps refusing freshly signed URLs")
            self.artifact = await self._renew()
            log.info("download.url_renewed file=%s", self.artifact.name)

    async def ensure_fresh(self, margin_s: float) -> None:
        deadline = expires_at(self.url)
        if deadline is not None and deadline - time.time() < margin_s:
            await self.renew_after(self.url)


def _prepare(folder: Path, part: Path, size: int | None, *, sparse: bool = False) -> int:
    """Make the folder and check free space; how many bytes of a one-stream part can be resumed.

    `sparse`: a ranged download's part, preallocated to full size; what is left to write
    is what its blocks do not hold yet.
    """
    folder.mkdir(parents=True, exist_ok=True)
    exists = part.exists()
    have = part.stat().st_size if exists else 0
    if size is not None and have > size:
        have = 0  # a part longer than the file is not ours to trust
    written = part.stat().st_blocks * 512 if sparse and exists else have
    needed = (size or 0) - min(written, size or 0)
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    if needed > 0 and free < needed + FREE_SPACE_MARGIN_BYTES:
        raise VerificationFailed(
            f"not enough free space in {folder}: {part.name} needs {needed / 1e6:,.0f} MB, {free / 1e6:,.0f} MB "
            "are free; free some space (or choose another --out), then run again"
        )
    return have


def _total_of(resp: aiohttp.ClientResponse, known: int | None) -> int | None:
    """The file's size: as the job says, else from a 416's `Content-Range: bytes */N`."""
    if known is not None:
        return known
    match = re.match(r"bytes \*/(\d+)", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _place(part: Path, final: Path, hashes: Hashes, size: int | None, md5: str | None) -> Fetched:
    return place(part, final, hashes, size_bytes=size, md5=md5)


def _xml_code(body: str) -> str:
    match = re.search(r"<Code>([^<]+)</Code>", body)
    return match.group(1) if match else "no error code"


class Downloader:
    def __init__(
        self,
        *,
        timeouts: Timeouts | None = None,
        connections: int = 32,
        parallel_min_bytes: int = PARALLEL_MIN_BYTES,
        range_bytes: int = RANGE_BYTES,
        connections_per_file: int = CONNECTIONS_PER_FILE,
    ) -> None:
        self._timeouts = timeouts or Timeouts()
        self._connections = connections
        self.parallel_min_bytes = parallel_min_bytes
        self.range_bytes = range_bytes
        self.connections_per_file = connections_per_file
        self._session: aiohttp.ClientSession | None = None
        self._io: anyio.CapacityLimiter | None = None
        self.transfers: dict[str, Transfer] = {}  # in flight, by "job/name"
        self._finished_bytes = 0

    @property
    def bytes_fetched(self) -> int:
        return self._finished_bytes + sum(t.done for t in self.transfers.values())

    async def _thread(self, func: Callable[..., T], *args: object) -> T:
        return await anyio.to_thread.run_sync(func, *args, limiter=self._io)

    async def __aenter__(self) -> Downloader:
        self._io = anyio.CapacityLimiter(IO_THREADS)
        # A read timeout per chunk, never a total: a 6 GB checkpoint may take an hour.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._timeouts.connect_s, sock_read=self._timeouts.download_read_s
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=self._connections),
            auto_decompress=False,  # the bytes as stored: sizes and hashes are of those
            read_bufsize=READ_BUFFER_BYTES,
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
        part_log: PartLog,
        *,
        attempts: int,
        renew_margin_s: float,
    ) -> Fetched:
        """Download `artifact` into `folder`, resuming, renewing and retrying as needed."""
        key = f"{folder.name}/{artifact.name}"
        transfer = self.transfers[key] = Transfer(key, artifact.size_bytes)
        try:
            return await self._fetch(artifact, folder, renew, part_log, transfer, attempts, renew_margin_s)
        finally:
            self._finished_bytes += transfer.done
            del self.transfers[key]

    async def _fetch(
        self,
        artifact: Artifact,
        folder: Path,
        renew: Callable[[], Awaitable[Artifact]],
        part_log: PartLog,
        transfer: Transfer,
        attempts: int,
        renew_margin_s: float,
    ) -> Fetched:
        source = _Source(artifact, renew)
        final = folder / artifact.name
        part = folder / (artifact.name + ".part")
        size = artifact.size_bytes
        parallel = size is not None and size >= self.parallel_min_bytes
        delay = BACKOFF_S
        last: Exception | None = None
        for _ in range(attempts):
            await source.ensure_fresh(renew_margin_s)
            try:
                if parallel and size is not None:
                    await self._thread(partial(_prepare, folder, part, size, sparse=True))
                    hashes, md5 = await self._ranged(source, part, size, part_log, transfer)
                    return await self._thread(_place, part, final, hashes, size, md5)
                return await self._one_stream(source, folder, part, final, part_log, transfer)
            except RangesIgnored:
                log.info("download.ranges_ignored file=%s: one stream instead", artifact.name)
                parallel = False
                part_log.clear()
                part.unlink(missing_ok=True)
            except ObjectChanged as exc:
                log.warning("download.object_changed file=%s %s: starting over", artifact.name, exc)
                part_log.clear()
                part_log.set_etag(None)
                part.unlink(missing_ok=True)
            except UrlExpired:
                await source.renew_after(source.url)
            except (FileGone, VerificationFailed):
                raise
            except DownloadError as exc:
                last = exc
                log.info("download.retry file=%s wait_s=%.1f error=%s", artifact.name, delay, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        raise DownloadError(f"{artifact.name}: gave up after {attempts} attempts: {last}")

    async def _ranged(
        self, source: _Source, part: Path, size: int, part_log: PartLog, transfer: Transfer
    ) -> tuple[Hashes, str | None]:
        assert self._session is not None, "use Downloader in `async with`"
        return await fetch_ranges(
            self._session,
            source,
            part,
            size,
            part_log,
            connections=self.connections_per_file,
            range_bytes=self.range_bytes,
            counter=transfer.counter,
            io=self._io,
        )

    async def _one_stream(
        self, source: _Source, folder: Path, part: Path, final: Path, part_log: PartLog, transfer: Transfer
    ) -> Fetched:
        assert self._session is not None, "use Downloader in `async with`"
        artifact = source.artifact
        have = await self._thread(_prepare, folder, part, artifact.size_bytes)
        known_etag = part_log.etag() if have else None
        headers = {"Range": f"bytes={have}-"} if have else {}
        where = redact(artifact.url)
        try:
            async with self._session.get(artifact.url, headers=headers) as resp:
                if resp.status == 416 and have and have == _total_of(resp, artifact.size_bytes):
                    # The part is already whole (killed before its rename): check it and place it.
                    writer = await self._thread(partial(PartWriter, part, have, md5=False))
                    md5 = None
                elif resp.status == 416:
                    await self._thread(part.unlink)  # a part that fits no size we know: start over
                    raise DownloadError(f"{artifact.name}: the partial file does not fit; fetching it again")
                elif resp.status in (400, 401, 403):
                    raise UrlExpired(
                        f"{artifact.name}: storage answered {resp.status} ({_xml_code(await resp.text())})"
                    )
                elif resp.status in (404, 410):
                    raise FileGone(f"{artifact.name}: storage no longer has it ({where})")
                elif resp.status not in (200, 206):
                    raise DownloadError(f"{artifact.name}: storage answered HTTP {resp.status}")
                else:
                    etag = resp.headers.get("ETag")
                    if resp.status == 206 and known_etag and etag and etag != known_etag:
                        raise ObjectChanged(f"the stored object changed under the part (ETag {known_etag} -> {etag})")
                    start = self._start_of(resp, have, artifact)
                    if start == 0 and artifact.size_bytes is not None and artifact.size_bytes > CHUNK_BYTES:
                        # Worth a commit only where a resume is worth it. Files of unknown size are
                        # images, which come whole or not at all, and storage's md5 guards them.
                        part_log.set_etag(etag)
                    md5 = storage_md5(resp.headers.getall("x-goog-hash", []))
                    writer = await self._stream(resp, part, start, transfer, md5=md5 is not None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"{artifact.name}: transfer broke ({type(exc).__name__}) from {where}") from exc
        await self._thread(writer.close)
        return await self._thread(_place, part, final, writer.hashes, artifact.size_bytes, md5)

    @staticmethod
    def _start_of(resp: aiohttp.ClientResponse, have: int, artifact: Artifact) -> int:
        """Where this body starts in the file: `have` on a good 206, else 0 (start over)."""
        if resp.status == 200:
            return 0
        match = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != have:
            got = resp.headers.get("Content-Range")
            raise DownloadError(f"{artifact.name}: Content-Range {got!r} does not resume at {have}")
        total = match.group(3)
        if artifact.size_bytes is not None and total != "*" and int(total) != artifact.size_bytes:
            raise ObjectChanged(f"storage now has {total} bytes, the job says {artifact.size_bytes}")
        return have

    async def _stream(
        self, resp: aiohttp.ClientResponse, part: Path, start: int, transfer: Transfer, *, md5: bool
    ) -> PartWriter:
        """Write the body into `part` from `start`, hashing as it goes, off the event loop."""
        writer = await self._thread(partial(PartWriter, part, start, md5=md5))
        transfer.counter[0] = start
        buffer = bytearray()
        try:
            async for piece in resp.content.iter_chunked(CHUNK_BYTES):
                buffer += piece
                if len(buffer) >= CHUNK_BYTES:
                    full, buffer = buffer, bytearray()  # hand the block over: no copy
                    await self._thread(writer.write, full)
                    transfer.counter[0] += len(full)
        finally:
            # Bytes that arrived before a break are good bytes: keep them to resume after.
            with anyio.CancelScope(shield=True):
                if buffer:
                    await self._thread(writer.write, buffer)
                    transfer.counter[0] += len(buffer)
                await self._thread(writer.close)
        return writer
