"""Large files over several connections, on fixed-size ranges, each retried on its own.

Every finished range is synced and recorded through a `PartLog` (the state store),
so a restart, even after SIGKILL, fetches only the ranges that were not finished.
A hasher follows the finished prefix in order, reading back what was just written
(from the page cache), so sha256 and md5 are ready when the last range lands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import aiohttp
import anyio

from .errors import DownloadError, FileGone, UrlExpired
from .verify import CONTENT_RANGE, READ_BYTES, Hashes, storage_md5

RANGE_ATTEMPTS = 5
RANGE_BACKOFF_S = 0.25
WRITE_BYTES = 1024 * 1024


class PartLog(Protocol):
    """What a partial download remembers across restarts."""

    def etag(self) -> str | None: ...
    def set_etag(self, etag: str | None) -> None: ...
    def ranges_done(self) -> set[int]: ...
    def mark_range_done(self, index: int) -> None: ...
    def clear(self) -> None: ...


class RangesIgnored(DownloadError):
    """Storage answered a range request with the whole file: fetch it in one stream."""


class ObjectChanged(DownloadError):
    """The stored object changed (a new ETag) under a partial download: start over."""


class Renewable(Protocol):
    @property
    def url(self) -> str: ...
    async def renew_after(self, stale_url: str) -> None: ...


def _preallocate(part: Path, size: int) -> bool:
    """A .part of the full size; False when it had to be made anew (nothing in it to trust)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    if part.exists() and part.stat().st_size == size:
        return True
    with part.open("wb") as fh:
        fh.truncate(size)
    return False


def _write_at(fd: int, offset: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


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
    counter: list[int] | None = None,
    io: anyio.CapacityLimiter | None = None,
) -> tuple[Hashes, str | None]:
    """Fill `part` (of `size` bytes) range by range; its hashes and storage's md5, if given."""
    if await anyio.to_thread.run_sync(_preallocate, part, size, limiter=io):
        done = log.ranges_done()
    else:
        log.clear()  # the store is used from this (the event loop's) thread only
        done = set()
    count = -(-size // range_bytes)
    todo = [i for i in range(count) if i not in done]
    md5: list[str | None] = [None]
    headers_seen = anyio.Event()  # set by the first answer: we then know if an md5 is coming
    result: list[Hashes] = []
    progress = {"event": anyio.Event()}
    fd = os.open(part, os.O_RDWR)

    def bounds(i: int) -> tuple[int, int]:
        return i * range_bytes, min(size, (i + 1) * range_bytes)

    async def fetch_one(i: int) -> None:
        start, end = bounds(i)
        delay = RANGE_BACKOFF_S
        for attempt in range(RANGE_ATTEMPTS):
            url = source.url
            try:
                await _get_range(session, url, fd, (start, end, size), log, md5, headers_seen, counter, io)
                break
            except UrlExpired:
                await source.renew_after(url)
            except (RangesIgnored, ObjectChanged, FileGone):
                raise
            except DownloadError:
                if attempt == RANGE_ATTEMPTS - 1:
                    raise
                await anyio.sleep(delay)
                delay *= 2
        else:
            raise DownloadError(f"{part.name}: bytes {start}-{end - 1} kept failing")
        await anyio.to_thread.run_sync(os.fdatasync, fd, limiter=io)
        log.mark_range_done(i)  # only after the bytes are synced
        done.add(i)
        progress["event"].set()

    async def worker(queue: list[int]) -> None:
        while queue:
            await fetch_one(queue.pop(0))

    async def hasher() -> None:
        if todo:
            await headers_seen.wait()
        hashes = Hashes(md5=md5[0] is not None)
        for i in range(count):
            while i not in done:
                progress["event"] = anyio.Event()
                if i in done:
                    break
                await progress["event"].wait()
            start, end = bounds(i)
            await anyio.to_thread.run_sync(_hash_range, fd, start, end, hashes, limiter=io)
        result.append(hashes)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hasher)
            queue = list(todo)
            for _ in range(min(connections, len(todo))):
                tg.start_soon(worker, queue)
    except BaseExceptionGroup as group:
        raise _decisive(group) from None
    finally:
        os.close(fd)
    return result[0], md5[0]


# When several connections fail at once, the caller acts on the most decisive reason.
_PRECEDENCE: tuple[type[DownloadError], ...] = (FileGone, ObjectChanged, RangesIgnored, UrlExpired, DownloadError)


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
            etag = resp.headers.get("ETag")
            known = log.etag()
            if known is None and etag:
                log.set_etag(etag)
            elif etag and etag != known:
                raise ObjectChanged(f"the stored object changed (ETag {known} -> {etag})")
            md5[0] = md5[0] or storage_md5(resp.headers.getall("x-goog-hash", []))
            headers_seen.set()
            offset = start
            buffer = bytearray()
            async for piece in resp.content.iter_chunked(WRITE_BYTES):
                buffer += piece
                if len(buffer) >= WRITE_BYTES:
                    full, buffer = buffer, bytearray()  # hand the block over: no copy
                    await anyio.to_thread.run_sync(_write_at, fd, offset, full, limiter=io)
                    offset += len(full)
                    if counter is not None:
                        counter[0] += len(full)
            if buffer:
                await anyio.to_thread.run_sync(_write_at, fd, offset, buffer, limiter=io)
                offset += len(buffer)
                if counter is not None:
                    counter[0] += len(buffer)
            if offset != end:
                raise DownloadError(f"range {start}-{end - 1} ended at {offset}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DownloadError(f"range {start}-{end - 1} broke ({type(exc).__name__})") from exc
