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
from .verify import CONTENT_RANGE, READ_BYTES, Hashes, storage_md5, write_at

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
    counter: list[int] | None = None,
    io: anyio.CapacityLimiter | None = None,
) -> tuple[Hashes, str | None]:
    """Fill `part` (of `size` bytes) range by range; its hashes and storage's md5, if given."""
    on_disk = await anyio.to_thread.run_sync(part_size, part, limiter=io)
    record = await log.record()  # the store is used from this (the event loop's) thread only
    covered = record.covered() if record is not None and record.size == size else []
    if not covered or on_disk is None or on_disk > size or covered[-1][1] > min(on_disk, size):
        # Nothing proven, or proven bytes the file cannot hold: forget them first, then the file.
        await log.start_over(size)
        covered = []
        etag: list[str | None] = [None]
        await anyio.to_thread.run_sync(lambda: _allocate(part, size, fresh=True), limiter=io)
    else:
        etag = [record.etag if record is not None else None]
        await anyio.to_thread.run_sync(lambda: _allocate(part, size, fresh=False), limiter=io)
    todo = split(gaps(covered, size), range_bytes)
    pieces = sorted([*covered, *todo])  # the whole file in order, for the hasher
    fetching = set(todo)
    done = {i for i, piece in enumerate(pieces) if piece not in fetching}
    md5: list[str | None] = [None]
    headers_seen = anyio.Event()  # set by the first answer: we then know if an md5 is coming
    result: list[Hashes] = []
    progress = {"event": anyio.Event()}
    fd = os.open(part, os.O_RDWR)

    async def fetch_one(i: int) -> None:
        start, end = pieces[i]

        async def attempt() -> None:
            url = source.url
            try:
                await _get_range(session, url, fd, (start, end, size), log, etag, md5, headers_seen, counter, io)
            except UrlExpired:
                await source.renew_after(url)
                raise

        await retry.range_attempts(attempt, policy, f"{part.name} bytes {start}-{end - 1}")
        await anyio.to_thread.run_sync(os.fdatasync, fd, limiter=io)
        await log.prove(start, end - start)  # only after the bytes are synced
        crash_point("span-proven")
        done.add(i)
        progress["event"].set()

    async def worker(queue: list[int]) -> None:
        while queue:
            await fetch_one(queue.pop(0))

    async def hasher() -> None:
        if todo:
            await headers_seen.wait()
        hashes = Hashes(md5=md5[0] is not None)
        for i, (start, end) in enumerate(pieces):
            while i not in done:
                progress["event"] = anyio.Event()
                if i in done:
                    break
                await progress["event"].wait()
            await anyio.to_thread.run_sync(_hash_range, fd, start, end, hashes, limiter=io)
        result.append(hashes)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hasher)
            queue = [i for i in range(len(pieces)) if i not in done]
            for _ in range(min(connections, len(queue))):
                tg.start_soon(worker, queue)
    except BaseExceptionGroup as group:
        raise _decisive(group) from None
    finally:
        os.close(fd)
    return result[0], md5[0]


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


async def _get_range(
    session: aiohttp.ClientSession,
    url: str,
    fd: int,
    span: tuple[int, int, int],
    log: PartLog,
    etag: list[str | None],
    md5: list[str | None],
    headers_seen: anyio.Event,
    counter: list[int] | None,
    io: anyio.CapacityLimiter | None,
) -> None:
    start, end, size = span
    headers = {"Range": f"bytes={start}-{end - 1}"}
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status in (400, 401, 403):
                raise UrlExpired(f"storage answered {resp.status}")
            if resp.status in (404, 410):
                raise FileGone("storage no longer has it")
            if resp.status == 200:
                raise RangesIgnored("storage ignored the Range header")
            if resp.status != 206:
                raise DownloadError(f"storage answered HTTP {resp.status}")
            match = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not match or (int(match.group(1)), int(match.group(2)) + 1) != (start, end):
                raise DownloadError(f"Content-Range {resp.headers.get('Content-Range')!r} is not {start}-{end - 1}")
            if match.group(3) != "*" and int(match.group(3)) != size:
                raise ObjectChanged(f"storage now has {match.group(3)} bytes, not {size}")
            got = resp.headers.get("ETag")
            if etag[0] is None and got:
                etag[0] = got
                await log.set_etag(got)
            elif got and got != etag[0]:
                raise ObjectChanged(f"the stored object changed (ETag {etag[0]} -> {got})")
            md5[0] = md5[0] or storage_md5(resp.headers.getall("x-goog-hash", []))
            headers_seen.set()
            offset = start
            buffer = bytearray()
            async for piece in resp.content.iter_chunked(WRITE_BYTES):
                buffer += piece
                if len(buffer) >= WRITE_BYTES:
                    full, buffer = buffer, bytearray()  # hand the block over: no copy
                    await anyio.to_thread.run_sync(write_at, fd, offset, full, limiter=io)
                    offset += len(full)
                    if counter is not None:
                        counter[0] += len(full)
            if buffer:
                await anyio.to_thread.run_sync(write_at, fd, offset, buffer, limiter=io)
                offset += len(buffer)
                if counter is not None:
                    counter[0] += len(buffer)
            if offset != end:
                raise DownloadError(f"range {start}-{end - 1} ended at {offset}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DownloadError(f"range {start}-{end - 1} broke ({type(exc).__name__})") from exc
