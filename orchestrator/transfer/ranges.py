"""Large files over several connections, each range retried on its own
(`api/retry.range_attempts`).

What is proven of the `.part` (see `store/parts.py`) is reused exactly: only the gaps are
fetched, cut into ranges of the current `range_bytes`. Every finished range is synced
and then recorded as a span, so a restart, even after SIGKILL, fetches only bytes that
were never proven. The hashes (sha256, and storage's md5/crc32c where given) follow the
file in order (`InOrderHashes`): the range at the hasher's position is hashed as it
arrives, beside its write; blocks that arrive ahead are kept for it within
`HASH_AHEAD_BYTES`; only what did not fit, and what earlier runs proved, is read back.
"""

from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import aiohttp
import anyio

from ..api import retry
from ..config import RetryPolicy
from ..crashpoints import crash_point
from ..errors import DownloadError, FileGone, NoSpace, ObjectChanged, RangesIgnored, UrlExpired, first_error
from ..store.parts import PartLog, gaps, split
from . import storage
from .progress import Transfer
from .sink import in_pool, opened, pump, still_there, write_at
from .verify import READ_BYTES, Hashes, StorageHashes

BLOCK_BYTES = 512 * 1024  # a range's block: written and hashed at once (smaller than one stream's: many in flight)
HASH_AHEAD_BYTES = 4 * 1024 * 1024  # per file: blocks that arrived ahead of the hashes, kept for them


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
    pool: ThreadPoolExecutor,
    transfer: Transfer | None = None,
) -> tuple[Hashes, StorageHashes]:
    """Fill `part` (of `size` bytes) range by range; its hashes and storage's, where given."""
    covered, etag = await _proven_spans(part, size, log, pool)
    todo = split(gaps(covered, size), range_bytes)
    if transfer is not None:
        transfer.start_at(sum(end - start for start, end in covered))
    fd = await in_pool(pool, os.open, part, os.O_RDWR)
    try:
        fill = _RangeFill(session, source, fd, part, size, log, policy, transfer, pool, todo=todo, etag=etag)
        hashes = await fill.run(connections, covered)
        await still_there(part, fill.inode, pool)  # what was hashed is this file's bytes
    finally:
        os.close(fd)
    assert fill.expected is not None, "the hashes end only after storage's first answer, or with nothing to ask"
    return hashes, fill.expected


async def _proven_spans(
    part: Path, size: int, log: PartLog, pool: ThreadPoolExecutor
) -> tuple[list[tuple[int, int]], str | None]:
    """The spans proven of `part` that it still holds, and their object's ETag; with none, a
    fresh sparse part (the record forgotten first, then the file)."""
    on_disk = await in_pool(pool, part_size, part)
    record = await log.record()
    covered = record.covered() if record is not None and record.size == size else []
    if not covered or on_disk is None or on_disk > size or covered[-1][1] > min(on_disk, size):
        await log.start_over(size)
        await in_pool(pool, lambda: _allocate(part, size, fresh=True))
        return [], None
    await in_pool(pool, lambda: _allocate(part, size, fresh=False))
    return covered, record.etag if record is not None else None


class InOrderHashes:
    """The hashes of a file filled in any order, taken in order: a block at the current
    position is hashed as it comes (beside its write); one ahead is kept while the kept ones
    fit in `ahead_bytes`; the rest, and spans proven by earlier runs, are read back from the
    part once everything before them is hashed."""

    def __init__(self, fd: int, size: int, pool: ThreadPoolExecutor, *, ahead_bytes: int = HASH_AHEAD_BYTES) -> None:
        self.fd, self.size, self.pool, self.ahead_bytes = fd, size, pool, ahead_bytes
        self.hashes: Hashes | None = None  # made once storage's first answer says which hashes it gives
        self.position = 0  # every byte before it is hashed
        self.read_back = 0  # bytes hashed from the part rather than as they came (for the bench)
        self._written: list[tuple[int, int]] = []  # spans on the part not yet hashed, sorted, apart
        self._kept: dict[int, bytes] = {}
        self._kept_bytes = 0
        self._lock = anyio.Lock()
        self._changed = anyio.Event()

    def start(self, expected: StorageHashes) -> None:
        if self.hashes is None:
            self.hashes = Hashes(md5=expected.md5 is not None, crc32c=expected.crc32c is not None)
            self._wake()

    def written(self, start: int, end: int) -> None:
        """Bytes [start, end) are on the part (proven earlier, or just written)."""
        i = bisect.bisect_left(self._written, (start, end))
        self._written.insert(i, (max(start, self.position), end))
        merged: list[tuple[int, int]] = []
        for a, b in self._written:
            if b <= self.position or a >= b:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._written = merged
        self._wake()

    async def arrived(self, offset: int, block: memoryview) -> None:
        """A block that is being written at `offset`: hashed now if it is next, else kept if it fits."""
        end = offset + len(block)
        async with self._lock:
            if self.hashes is not None and offset <= self.position < end:
                await self.hashes.update_beside(block[self.position - offset :], self.pool)
                self.position = end
                self._wake()
            elif (
                offset > self.position
                and offset not in self._kept
                and self._kept_bytes + len(block) <= self.ahead_bytes
            ):
                self._kept[offset] = bytes(block)  # the block's buffer is reused once this returns
                self._kept_bytes += len(block)

    async def run(self) -> Hashes:
        """Follow the part to its end: kept blocks first, else read back what is written."""
        while True:
            async with self._lock:
                if self.hashes is not None and self.position >= self.size:
                    return self.hashes
                step = self._next() if self.hashes is not None else None
                if step is not None:
                    await self._take(*step)
                    continue
                changed = self._changed = anyio.Event()
            await changed.wait()

    def _next(self) -> tuple[int, bytes | None] | None:
        kept = self._kept.pop(self.position, None)
        if kept is not None:
            self._kept_bytes -= len(kept)
            return self.position + len(kept), kept
        for start, end in self._written:
            if start <= self.position < end:
                ahead = [k for k in self._kept if k > self.position]
                return min(end, self.position + READ_BYTES, *ahead), None
        return None

    async def _take(self, end: int, kept: bytes | None) -> None:
        assert self.hashes is not None
        if kept is not None:
            await in_pool(self.pool, self.hashes.update, kept)
        else:
            await in_pool(self.pool, _hash_range, self.fd, self.position, end, self.hashes)
            self.read_back += end - self.position
        self.position = end
        for offset in [k for k in self._kept if k < end]:  # kept blocks this read covered
            self._kept_bytes -= len(self._kept.pop(offset))

    def _wake(self) -> None:
        self._changed.set()


class _RangeFill:
    """One ranged fill of a part: workers fetch the gaps (each range under `range_attempts`),
    the hashes follow the whole file in order."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        source: Renewable,
        fd: int,
        part: Path,
        size: int,
        log: PartLog,
        policy: RetryPolicy,
        transfer: Transfer | None,
        pool: ThreadPoolExecutor,
        *,
        todo: list[tuple[int, int]],
        etag: str | None,
    ) -> None:
        self.session, self.source, self.fd, self.part, self.size, self.log = session, source, fd, part, size, log
        self.policy, self.transfer, self.pool = policy, transfer, pool
        self.todo = todo
        self.etag = etag
        self.expected: StorageHashes | None = None
        self.order = InOrderHashes(fd, size, pool)
        self.inode = os.fstat(fd).st_ino

    async def run(self, connections: int, covered: list[tuple[int, int]]) -> Hashes:
        for start, end in covered:
            self.order.written(start, end)
        queue = list(self.todo)
        if not queue:
            self.expected = StorageHashes()  # nothing to ask: no hash of storage's is coming
            self.order.start(self.expected)
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(min(connections, len(queue))):
                    tg.start_soon(self._worker, queue)
                hashes = await self.order.run()
        except BaseExceptionGroup as group:
            raise _decisive(group) from None
        return hashes

    async def _worker(self, queue: list[tuple[int, int]]) -> None:
        while queue:
            await self._fetch(*queue.pop(0))

    async def _fetch(self, start: int, end: int) -> None:
        async def attempt() -> None:
            url = self.source.url
            try:
                await self._get(url, start, end)
            except UrlExpired:
                await self.source.renew_after(url)
                raise

        await retry.range_attempts(attempt, self.policy, f"bytes {start}-{end - 1}")
        await in_pool(self.pool, os.fdatasync, self.fd)
        await self.log.prove(start, end - start)  # only after the bytes are synced
        crash_point("span-proven")

    async def _get(self, url: str, start: int, end: int) -> None:
        """One range into the part; the part's object (size, ETag) checked on every answer."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        got_here = 0  # bytes of this attempt counted as on hand: dropped again if it fails
        finished = False
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
                if self.expected is None:
                    self.expected = storage.storage_hashes(resp)
                    self.order.start(self.expected)
                offset = start
                async with opened(self.part, self.pool) as fh:
                    if os.fstat(fh.fileno()).st_ino != self.inode:
                        raise ObjectChanged(f"{self.part.name} was replaced while it was written")

                    async def sink(block: memoryview) -> None:
                        nonlocal offset, got_here
                        if offset + len(block) > end:
                            raise DownloadError(f"range {start}-{end - 1} sent more than asked")
                        with anyio.CancelScope(shield=True):  # the block's buffer is reused once this returns
                            async with anyio.create_task_group() as tg:
                                tg.start_soon(write_at, fh, offset, block)
                                tg.start_soon(self.order.arrived, offset, block)
                        self.order.written(offset, offset + len(block))
                        offset += len(block)
                        got_here += len(block)
                        if self.transfer is not None:
                            self.transfer.add(len(block))

                    await pump(resp.content, sink, block_bytes=BLOCK_BYTES)
                if offset != end:
                    raise DownloadError(f"range {start}-{end - 1} ended at {offset}")
                finished = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"range {start}-{end - 1} broke ({type(exc).__name__})") from exc
        finally:
            if not finished and self.transfer is not None:
                self.transfer.drop(got_here)  # the range comes again whole


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
    return first_error(group)  # an OSError reaches the callers that handle one
