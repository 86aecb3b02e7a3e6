"""Fetching one result file to disk without ever losing or corrupting it (rule 4).

Small files go in one stream to `<name>.part`; files of `parallel_min_bytes` or more go
over several connections in ranges (`transfer/ranges.py`). Either way only bytes proven in the
state store (`store/parts.py`: synced spans of an object of known size and ETag) are ever
reused: one stream resumes with `Range` from the end of the proven prefix, and proves
what it writes every `range_bytes`; a server that ignores `Range` answers 200 and the
file starts over; an object whose ETag or size changed starts over; a 416 proves
nothing and starts over. `verify.place` checks size, md5 and format before the rename.
A signed URL that has expired, or will within the margin, is renewed through the
caller's `renew` (a GET of the job) before a request, and on a 400/403 mid-way;
renewals cost no backoff. Only 200/206 bodies are written. Attempts: `api/retry.file_attempts`.

This module talks to storage, never to the API: its session carries no API key.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import aiohttp
import anyio

from ..api import retry
from ..config import (
    CONNECTIONS_PER_FILE,
    FILE_RETRY,
    PARALLEL_MIN_BYTES,
    RANGE_BYTES,
    RANGE_RETRY,
    RetryPolicy,
    RunSettings,
    Timeouts,
)
from ..crashpoints import crash_point
from ..errors import DownloadError, NoSpace, ObjectChanged, RangesIgnored, SpaceRefused, UrlExpired, first_error
from ..events import event
from ..models import Artifact
from ..store.parts import PartLog, PartRecord
from . import storage
from .progress import Transfer
from .ranges import fetch_ranges, part_size
from .sink import PartFile, in_pool, pump, still_there
from .urls import expires_at, redact
from .verify import DISK_FULL, Fetched, Hashes, StorageHashes, fsync_dir, place

log = logging.getLogger(__name__)
T = TypeVar("T")
RECORD_MIN_BYTES = 1024 * 1024  # one stream records proven bytes only for files larger than this
READ_BUFFER_BYTES = 256 * 1024  # aiohttp's buffer per connection
IO_THREADS = 4  # file writes and hashes of all downloads; more threads only add malloc arenas (RSS)
MAX_RENEWALS = 3  # per attempt cycle: a URL refused right after renewal is not a URL problem
# Free space kept beyond what a file still needs (for the store, job.json, other writers):
# a share of the file, within a floor and a cap.
FREE_SPACE_MARGIN_SHARE = 0.02
FREE_SPACE_MARGIN_MIN_BYTES = 1024 * 1024
FREE_SPACE_MARGIN_MAX_BYTES = 64 * 1024 * 1024


class Source:
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
            event(log, "download.url_renewed", file=self.artifact.name)

    async def ensure_fresh(self, margin_s: float) -> None:
        deadline = expires_at(self.url)
        if deadline is not None and deadline - time.time() < margin_s:
            await self.renew_after(self.url)


def free_space_margin(size: int) -> int:
    return min(FREE_SPACE_MARGIN_MAX_BYTES, max(FREE_SPACE_MARGIN_MIN_BYTES, int(size * FREE_SPACE_MARGIN_SHARE)))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 10_000_000 else f"{n / 1e6:,.0f} MB"


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _prepare(folder: Path, part: Path, size: int | None, proven: int) -> None:
    """Make the folder (its entry synced in its parent: a job's folder outlives a power cut);
    refuse a file the disk cannot hold with its margin, before a byte is fetched."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)
    if size is None:
        return
    needed = size - min(proven, size)
    margin = free_space_margin(size)
    free = _free_bytes(folder)
    if needed > 0 and free < needed + margin:
        raise SpaceRefused(
            f"not enough free space in {folder}: {part.name} needs {_mb(needed)} more, plus {_mb(margin)} kept "
            f"free ({FREE_SPACE_MARGIN_SHARE:.0%} of the file, at least {_mb(FREE_SPACE_MARGIN_MIN_BYTES)}, at most "
            f"{_mb(FREE_SPACE_MARGIN_MAX_BYTES)}); {_mb(free)} are free. Free some space (or choose another --out), "
            "then run again"
        )


def _disk_full(folder: Path, part: Path, size: int | None, record: PartRecord | None, error: Exception) -> NoSpace:
    """The message for a disk that filled up mid-download: how much more is needed, where."""
    proven = record.proven_bytes() if record is not None and record.size == size else 0
    try:
        free = _mb(_free_bytes(folder))
    except OSError:
        free = "an unknown amount"
    if size is None:
        need = "more space than is free"
    else:
        need = f"{_mb(size - proven)} more, plus {_mb(free_space_margin(size))} kept free"
    return NoSpace(
        f"{folder} filled up while writing {part.name} ({error}): it needs {need}; {free} are free. "
        f"The {_mb(proven)} already fetched and proven are kept; free some space (or choose another --out), "
        "then run again to resume"
    )


def _drop_other_parts(folder: Path, name: str, part: Path) -> None:
    """Partial files of this file under an earlier lease (`<name>.<epoch>.part`, a shared
    campaign): that worker lost the job, so they are never resumed. A worker that still writes
    one (it was frozen) writes into a file nobody reads, and its rename fails."""
    mine = _epoch_of(part.name, name)
    if mine is None or not folder.is_dir():
        return
    for other in folder.glob(f"{glob.escape(name)}.*.part"):
        epoch = _epoch_of(other.name, name)
        if epoch is not None and epoch < mine:
            other.unlink(missing_ok=True)


def _epoch_of(part_name: str, name: str) -> int | None:
    middle = part_name.removeprefix(name + ".").removesuffix(".part")
    return int(middle) if middle.isdigit() and part_name != middle else None


@dataclass(frozen=True, slots=True)
class _Resume:
    have: int  # proven bytes one stream resumes after
    recorded: bool  # does this file keep a record of its proven bytes?
    known_etag: str | None  # the object those bytes came from


class Downloader:
    def __init__(
        self,
        *,
        timeouts: Timeouts | None = None,
        connections: int = 32,
        parallel_min_bytes: int = PARALLEL_MIN_BYTES,
        range_bytes: int = RANGE_BYTES,
        connections_per_file: int = CONNECTIONS_PER_FILE,
        file_retry: RetryPolicy = FILE_RETRY,
        range_retry: RetryPolicy = RANGE_RETRY,
    ) -> None:
        self._timeouts = timeouts or Timeouts()
        self._connections = connections
        self.parallel_min_bytes = parallel_min_bytes
        self.range_bytes = range_bytes
        self.connections_per_file = connections_per_file
        self.file_retry = file_retry
        self.range_retry = range_retry
        self._session: aiohttp.ClientSession | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.transfers: dict[str, Transfer] = {}  # in flight, by "job/name"
        self._finished_bytes = 0

    @property
    def bytes_fetched(self) -> int:
        """Bytes received over the network by this run, all files together."""
        return self._finished_bytes + sum(t.received for t in self.transfers.values())

    @classmethod
    def for_settings(cls, settings: RunSettings) -> Downloader:
        """A downloader as a run's settings say (a campaign's, `jobs download`)."""
        return cls(
            timeouts=settings.timeouts,
            parallel_min_bytes=settings.parallel_min_bytes,
            range_bytes=settings.range_bytes,
            connections_per_file=settings.connections_per_file,
            file_retry=settings.file_retry,
            range_retry=settings.range_retry,
        )

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The threads that write and hash files, for all downloads (aiofiles' executor)."""
        assert self._pool is not None, "use Downloader in `async with`"
        return self._pool

    async def _thread(self, func: Callable[..., T], *args: object) -> T:
        return await in_pool(self.pool, func, *args)

    async def __aenter__(self) -> Downloader:
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="dreamlook-io")
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
        if self._pool is not None:
            await anyio.to_thread.run_sync(self._pool.shutdown)

    async def fetch(
        self,
        artifact: Artifact,
        folder: Path,
        renew: Callable[[], Awaitable[Artifact]],
        part_log: PartLog,
        *,
        renew_margin_s: float,
    ) -> Fetched:
        """Download `artifact` into `folder`, resuming, renewing and retrying as needed."""
        with self.tracked(f"{folder.name}/{artifact.name}", artifact.size_bytes) as transfer:
            return await self._fetch(artifact, folder, renew, part_log, transfer, renew_margin_s)

    @contextlib.contextmanager
    def tracked(self, key: str, size: int | None) -> Iterator[Transfer]:
        """A file in flight, shown by the progress display (also one going into a bucket)."""
        transfer = self.transfers[key] = Transfer(key, size)
        try:
            yield transfer
        finally:
            self._finished_bytes += transfer.received
            del self.transfers[key]

    @property
    def session(self) -> aiohttp.ClientSession:
        """Storage's connections (no API key): a bucket upload reads through them too."""
        assert self._session is not None, "use Downloader in `async with`"
        return self._session

    async def _fetch(
        self,
        artifact: Artifact,
        folder: Path,
        renew: Callable[[], Awaitable[Artifact]],
        part_log: PartLog,
        transfer: Transfer,
        renew_margin_s: float,
    ) -> Fetched:
        source = Source(artifact, renew)
        final = folder / artifact.name
        part = folder / (artifact.name + part_log.suffix)
        size = artifact.size_bytes
        parallel = [size is not None and size >= self.parallel_min_bytes]
        await self._thread(_drop_other_parts, folder, artifact.name, part)

        async def attempt() -> Fetched:
            await source.ensure_fresh(renew_margin_s)
            try:
                if parallel[0] and size is not None:
                    record = await part_log.record()
                    proven = record.proven_bytes() if record is not None and record.size == size else 0
                    await self._thread(_prepare, folder, part, size, proven)
                    hashes, expected = await self._ranged(source, part, size, part_log, transfer)
                    return await place(part, final, hashes, size_bytes=size, expected=expected, pool=self.pool)
                return await self._one_stream(source, folder, part, final, part_log, transfer)
            except RangesIgnored:
                event(log, "download.ranges_ignored", file=artifact.name)
                parallel[0] = False  # the proven spans stay: one stream resumes from their prefix
                raise
            except ObjectChanged as exc:
                event(log, "download.object_changed", file=artifact.name, reason=exc)
                await part_log.start_over(size)  # forget the spans first, then the bytes
                await self._thread(partial(part.unlink, missing_ok=True))
                raise
            except UrlExpired:
                await source.renew_after(source.url)
                raise
            except SpaceRefused:
                raise  # before a byte was written: the message says it all
            except NoSpace as exc:
                raise _disk_full(folder, part, size, await part_log.record(), exc) from exc
            except OSError as exc:
                if exc.errno not in DISK_FULL:
                    raise
                raise _disk_full(folder, part, size, await part_log.record(), exc) from exc

        return await retry.file_attempts(attempt, self.file_retry, artifact.name)

    async def _ranged(
        self, source: Source, part: Path, size: int, part_log: PartLog, transfer: Transfer
    ) -> tuple[Hashes, StorageHashes]:
        assert self._session is not None, "use Downloader in `async with`"
        return await fetch_ranges(
            self._session,
            source,
            part,
            size,
            part_log,
            connections=self.connections_per_file,
            range_bytes=self.range_bytes,
            policy=self.range_retry,
            transfer=transfer,
            pool=self.pool,
        )

    async def _one_stream(
        self, source: Source, folder: Path, part: Path, final: Path, part_log: PartLog, transfer: Transfer
    ) -> Fetched:
        assert self._session is not None, "use Downloader in `async with`"
        artifact = source.artifact
        size = artifact.size_bytes
        resume = await self._resume_point(folder, part, size, part_log)
        if resume.have and resume.have == size:
            # Every byte is proven (killed before its rename): check it and place it, no request.
            writer = await PartFile.open(part, resume.have, hashes=Hashes(md5=False), pool=self.pool)
            await writer.close()
            return await place(part, final, writer.hashes, size_bytes=size, expected=StorageHashes(), pool=self.pool)
        headers = {"Range": f"bytes={resume.have}-"} if resume.have else {}
        try:
            async with self._session.get(artifact.url, headers=headers) as resp:
                if resp.status == 416:
                    # Proves nothing about the part: forget it and fetch the file again.
                    if resume.recorded:
                        await part_log.start_over(size)
                    await self._thread(partial(part.unlink, missing_ok=True))
                    raise DownloadError(
                        f"{artifact.name}: storage refused to resume at byte {resume.have}; fetching it again"
                    )
                await storage.raise_for_status(resp, artifact.name)
                start = await self._body_start(resp, resume, artifact, part_log)
                expected = storage.storage_hashes(resp)
                prove = part_log.prove if resume.recorded else None
                writer = await self._stream(resp, part, start, transfer, expected=expected, prove=prove)
        except (aiohttp.ClientError, TimeoutError) as exc:
            where = redact(artifact.url)
            raise DownloadError(f"{artifact.name}: transfer broke ({type(exc).__name__}) from {where}") from exc
        await still_there(part, writer.inode, self.pool)
        return await place(part, final, writer.hashes, size_bytes=size, expected=expected, pool=self.pool)

    async def _resume_point(self, folder: Path, part: Path, size: int | None, part_log: PartLog) -> _Resume:
        """Where one stream starts: the end of the proven prefix, if the part still holds it."""
        # Worth a record only where a resume is worth it. Files of unknown size are images,
        # which come whole or not at all, and storage's md5 guards them.
        record = await part_log.record() if size is not None else None
        # A record left by ranges of a small file is kept up to date too: it must not outlive its bytes.
        recorded = size is not None and (size > RECORD_MIN_BYTES or record is not None)
        on_disk = await self._thread(part_size, part)
        have = record.prefix() if record is not None and record.size == size else 0
        if on_disk is None or have > on_disk:
            have = 0  # proven bytes the file no longer holds
        await self._thread(_prepare, folder, part, size, have)
        if recorded:
            if have:
                await part_log.keep_only([(0, have)])  # what follows the prefix is about to be overwritten
            else:
                await part_log.start_over(size)
        known_etag = record.etag if have and record is not None else None
        return _Resume(have=have, recorded=recorded, known_etag=known_etag)

    async def _body_start(
        self, resp: aiohttp.ClientResponse, resume: _Resume, artifact: Artifact, part_log: PartLog
    ) -> int:
        """Where this body starts in the file: the proven prefix on a good 206, else 0 (start over)."""
        etag = resp.headers.get("ETag")
        if resp.status == 206 and resume.known_etag and etag != resume.known_etag:
            raise ObjectChanged(f"the stored object changed under the part (ETag {resume.known_etag} -> {etag})")
        start = 0
        if resp.status == 206:
            got = storage.content_range(resp)
            if got is None or got.first != resume.have:
                shown = resp.headers.get("Content-Range")
                raise DownloadError(f"{artifact.name}: Content-Range {shown!r} does not resume at {resume.have}")
            if artifact.size_bytes is not None and got.total is not None and got.total != artifact.size_bytes:
                raise ObjectChanged(f"storage now has {got.total} bytes, the job says {artifact.size_bytes}")
            start = resume.have
        if resume.recorded and start == 0:
            if resume.have:
                await part_log.start_over(artifact.size_bytes)  # a 200: the whole file comes again
            await part_log.set_etag(etag)
        return start

    async def _stream(
        self,
        resp: aiohttp.ClientResponse,
        part: Path,
        start: int,
        transfer: Transfer,
        *,
        expected: StorageHashes,
        prove: Callable[[int, int], Awaitable[None]] | None,
    ) -> PartFile:
        """Write the body into `part` from `start`, hashing beside the writes, off the event loop;
        with `prove`, sync and record the prefix every `range_bytes` and at the end or a break."""
        hashes = Hashes(md5=expected.md5 is not None, crc32c=expected.crc32c is not None)
        writer = await PartFile.open(part, start, hashes=hashes, pool=self.pool)
        transfer.start_at(start)
        proven = start
        syncing = False  # a proof under way: one at a time, each of a prefix longer than the last
        sync_failed = False  # Linux reports a lost write once: a later sync's success proves nothing

        async def prove_prefix(upto: int) -> None:
            """Sync, then record `upto` bytes as proven: what was written before the sync began."""
            nonlocal proven, syncing, sync_failed
            try:
                try:
                    await writer.sync()
                except OSError:
                    sync_failed = True
                    raise
                if prove is not None and upto > proven and not sync_failed:
                    await prove(0, upto)  # only after the bytes are synced
                    proven = upto
                    crash_point("span-proven")
            finally:
                syncing = False

        async def sink(block: memoryview, tg: anyio.abc.TaskGroup) -> None:
            nonlocal syncing
            await writer.write(block)
            transfer.add(len(block))
            if prove is not None and not syncing and writer.position - proven >= self.range_bytes:
                syncing = True  # the sync runs beside the next writes: the body keeps coming
                tg.start_soon(prove_prefix, writer.position)

        try:
            async with anyio.create_task_group() as tg:
                await pump(resp.content, partial(sink, tg=tg), size=resp.content_length)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        finally:
            # Bytes written before a break, a stop or a full disk are good bytes: keep them to resume after.
            with anyio.CancelScope(shield=True):
                try:
                    await prove_prefix(writer.position)
                finally:
                    await writer.close()
        return writer
