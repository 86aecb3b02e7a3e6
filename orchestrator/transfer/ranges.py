"""Large files over several connections, each range retried on its own
(`api/retry.range_attempts`).

What is proven of the `.part` (see `store/parts.py`) is reused exactly: only the gaps are
fetched, cut into ranges of the current `range_bytes`. Every finished range is synced
and then recorded as a span, so a restart, even after SIGKILL, fetches only bytes that
were never proven. A hasher follows the file in order, reading back the proven bytes
(from an earlier run too) and each range just written, so sha256 and md5 are of the
whole file and ready when the last range lands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import aiohttp
import anyio

from ..api import retry
from ..config import RetryPolicy
from ..crashpoints import crash_point
from ..errors import DownloadError, FileGone, NoSpace, ObjectChanged, RangesIgnored, UrlExpired
from ..store.parts import PartLog, gaps, split
from . import storage
from .progress import Transfer
from .verify import READ_BYTES, Hashes, write_at

WRITE_BYTES = 1024 * 1024


class Renewable(Protocol):
    @property
    def url(self) -> str: ...
    async def renew_after(self, stale_url: str) -> None: ...


def part_size(part: Path) -> int | None:
    return part.stat().st_size if part.exists() else None


def _allocate(part: Path, size: int, *, fresh: bool) -> None:
    """A .part of the full size (sparse): made anew, or an existing one extended."""
    part.parent.mkdir(parents=True, exist_ok=True)
    with part.open("wb" if fresh or not part.exists() else "r+b") as fh:
        fh.truncate(size)


def _hash_range(fd: int, start: int, end: int, hashes: Hashes) -> None:
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(READ_BYTES, end - pos), pos)
        if not chunk:
            raise DownloadError(f"the part file ends at {pos}, before {end}")
        hashes.update(chunk)
        pos += len(chunk)


async def fetch_ranges(
    session: aiohttp.ClientSession,
    source: Renewable,
    part: Path,
    size: int,
    log: PartLog,
    *,
    connections: int,
    range_bytes: int,
    policy: RetryPolicy,
    transfer: Transfer | None = None,
    io: anyio.CapacityLimiter | None = None,
) -> tuple[Hashes, str | None]:
    """Fill `part` (of `size` bytes) range by range; its hashes and storage's md5, if given."""
    covered, etag = await _proven_spans(part, size, log, io)
    if transfer is not None:
        transfer.start_at(sum(end - start for start, end in covered))
    todo = split(gaps(covered, size), range_bytes)
    fd = await anyio.to_thread.run_sync(os.open, part, os.O_RDWR)
    try:
        fill = _RangeFill(session, source, fd, size, log, policy, transfer, io, covered=covered, todo=todo, etag=etag)
        hashes = await fill.run(connections)
    finally:
        os.close(fd)
    return hashes, fill.md5


async def _proven_spans(
    part: Path, size: int, log: PartLog, io: anyio.CapacityLimiter | None
) -> tuple[list[tuple[int, int]], str | None]:
    """The spans proven of `part` that it still holds, and their object's ETag; with none, a
    fresh sparse part (the record forgotten first, then the file)."""
    on_disk = await anyio.to_thread.run_sync(part_size, part, limiter=io)
    record = await log.record()
    covered = record.covered() if record is not None and record.size == size else []
    if not covered or on_disk is None or on_disk > size or covered[-1][1] > min(on_disk, size):
        await log.start_over(size)
        await anyio.to_thread.run_sync(lambda: _allocate(part, size, fresh=True), limiter=io)
        return [], None
    await anyio.to_thread.run_sync(lambda: _allocate(part, size, fresh=False), limiter=io)
    return covered, record.etag if record is not None else None


class _RangeFill:
    """One ranged fill of a part: workers fetch the gaps (each range under `range_attempts`),
    a hasher follows the whole file in order as ranges are proven."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        source: Renewable,
        fd: int,
        size: int,
        log: PartLog,
        policy: RetryPolicy,
        transfer: Transfer | None,
        io: anyio.CapacityLimiter | None,
        *,
        covered: list[tuple[int, int]],
        todo: list[tuple[int, int]],
        etag: str | None,
    ) -> None:
        self.session, self.source, self.fd, self.size, self.log = session, source, fd, size, log
        self.policy, self.transfer, self.io = policy, transfer, io
        self.pieces = sorted([*covered, *todo])  # the whole file in order, for the hasher
        fetching = set(todo)
        self.done = {i for i, piece in enumerate(self.pieces) if piece not in fetching}
        self.etag = etag
        self.md5: str | None = None
        self.headers_seen = anyio.Event()  # set by the first answer: we then know if an md5 is coming
        self.progress = anyio.Event()
        self._hashes: Hashes | None = None

    async def run(self, connections: int) -> Hashes:
        queue = [i for i in range(len(self.pieces)) if i not in self.done]
        if not queue:
            self.headers_seen.set()  # nothing to ask: no md5 is coming
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._hash_all)
                for _ in range(min(connections, len(queue))):
                    tg.start_soon(self._worker, queue)
        except BaseExceptionGroup as group:
            raise _decisive(group) from None
        assert self._hashes is not None
        return self._hashes

    async def _worker(self, queue: list[int]) -> None:
        while queue:
            await self._fetch(queue.pop(0))

    async def _fetch(self, i: int) -> None:
        start, end = self.pieces[i]

        async def attempt() -> None:
            url = self.source.url
            try:
                await self._get(url, start, end)
            except UrlExpired:
                await self.source.renew_after(url)
                raise

        await retry.range_attempts(attempt, self.policy, f"bytes {start}-{end - 1}")
        await anyio.to_thread.run_sync(os.fdatasync, self.fd, limiter=self.io)
        await self.log.prove(start, end - start)  # only after the bytes are synced
        crash_point("span-proven")
        self.done.add(i)
        self.progress.set()

    async def _hash_all(self) -> None:
        await self.headers_seen.wait()
        hashes = Hashes(md5=self.md5 is not None)
        for i, (start, end) in enumerate(self.pieces):
            while i not in self.done:
                self.progress = anyio.Event()
                if i in self.done:
                    break
                await self.progress.wait()
            await anyio.to_thread.run_sync(_hash_range, self.fd, start, end, hashes, limiter=self.io)
        self._hashes = hashes

    async def _get(self, url: str, start: int, end: int) -> None:
        """One range into the part; the part's object (size, ETag) checked on every answer."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        try:
            async with self.session.get(url, headers=headers) as resp:
                await storage.raise_for_status(resp, f"bytes {start}-{end - 1}")
                if resp.status == 200:
                    raise RangesIgnored("storage ignored the Range header")
                got_range = storage.content_range(resp)
                if got_range is None or (got_range.first, got_range.end) != (start, end):
                    raise DownloadError(f"Content-Range {resp.headers.get('Content-Range')!r} is not {start}-{end - 1}")
                if got_range.total is not None and got_range.total != self.size:
                    raise ObjectChanged(f"storage now has {got_range.total} bytes, not {self.size}")
                got = resp.headers.get("ETag")
                if self.etag is None and got:
                    self.etag = got
                    await self.log.set_etag(got)
                elif got and got != self.etag:
                    raise ObjectChanged(f"the stored object changed (ETag {self.etag} -> {got})")
                self.md5 = self.md5 or storage.storage_md5(resp)
                self.headers_seen.set()
                offset = start
                buffer = bytearray()
                async for piece in resp.content.iter_chunked(WRITE_BYTES):
                    buffer += piece
                    if len(buffer) >= WRITE_BYTES:
                        full, buffer = buffer, bytearray()  # hand the block over: no copy
                        await anyio.to_thread.run_sync(write_at, self.fd, offset, full, limiter=self.io)
                        offset += len(full)
                        if self.transfer is not None:
                            self.transfer.add(len(full))
                if buffer:
                    await anyio.to_thread.run_sync(write_at, self.fd, offset, buffer, limiter=self.io)
                    offset += len(buffer)
                    if self.transfer is not None:
                        self.transfer.add(len(buffer))
                if offset != end:
                    raise DownloadError(f"range {start}-{end - 1} ended at {offset}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"range {start}-{end - 1} broke ({type(exc).__name__})") from exc


# When several connections fail at once, the caller acts on the most decisive reason.
_PRECEDENCE: tuple[type[DownloadError], ...] = (
    NoSpace,
    FileGone,
    ObjectChanged,
    RangesIgnored,
    UrlExpired,
    DownloadError,
)


def _decisive(group: BaseExceptionGroup) -> BaseException:
    for kind in _PRECEDENCE:
        matched, _ = group.split(kind)
        if matched is not None:
            first: BaseException = matched
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            return first
    return group
