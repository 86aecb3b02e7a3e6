"""The file layer of downloads: a `.part` written through aiofiles on the downloads' own small
thread pool, hashed beside the writes, and the pump that receives a body into reused blocks.

The network, the disk and the hashes each have their own worker: while a block is written
(one pool thread) and hashed (one or two more; hashlib releases the GIL on large buffers), the
event loop receives the next block. Blocks are a few reused buffers per body, so memory stays
bounded and no buffer is allocated per chunk. A block being written or hashed is never reused
or cancelled half-way: its work is shielded, so the hashes always match the bytes on disk up
to `PartFile.position`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import aiofiles
import aiohttp
import anyio
from aiofiles.threadpool.binary import AsyncFileIO

from ..errors import DownloadError, NoSpace, ObjectChanged, first_error
from .verify import DISK_FULL, READ_BYTES, Hashes

T = TypeVar("T")
BLOCK_BYTES = 1024 * 1024  # what the pump hands to the disk and the hashes at once
BLOCKS_PER_BODY = 3  # one filling, one queued, one being written and hashed


async def in_pool(pool: ThreadPoolExecutor, func: Callable[..., T], *args: object) -> T:
    """`func(*args)` on the downloads' pool (blocking file work off the event loop). Shielded: a
    call that has started finishes before its caller moves on, even when the caller is
    cancelled, so no file is closed (or its folder unmounted) under a thread still using it."""
    with anyio.CancelScope(shield=True):
        result = await asyncio.get_running_loop().run_in_executor(pool, func, *args)
    return result


@contextlib.asynccontextmanager
async def opened(path: Path, pool: ThreadPoolExecutor) -> AsyncIterator[AsyncFileIO]:
    """`path` opened for reading and writing (made if missing) through aiofiles on `pool`; its
    opening and closing are shielded as `in_pool` is."""
    try:
        fh = await _open(path, pool, create=False)  # a part that disappeared is not made anew behind the fill's fd
    except FileNotFoundError as exc:
        raise ObjectChanged(f"{path.name} was removed while it was written") from exc
    try:
        yield fh
    finally:
        with anyio.CancelScope(shield=True):
            await fh.close()


async def _open(path: Path, pool: ThreadPoolExecutor, *, create: bool = True) -> AsyncFileIO:
    with anyio.CancelScope(shield=True):  # an fd opened in the pool is never left behind by a cancel
        fh = await aiofiles.open(path, "r+b", buffering=0, opener=_create if create else None, executor=pool)
    return fh


def _create(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CREAT, 0o644)


async def still_there(path: Path, inode: int, pool: ThreadPoolExecutor) -> None:
    """The file at `path` is still the one written through an fd of inode `inode`: a part removed
    or replaced meanwhile (a clean-up, a person, another writer) is never placed or trusted."""
    try:
        now = (await in_pool(pool, os.stat, path)).st_ino
    except FileNotFoundError:
        now = None
    if now != inode:
        raise ObjectChanged(f"{path.name} was removed or replaced while it was written")


class PartFile:
    """A `.part` written from `start` on, hashed as it goes. The bytes before `start` (proven
    earlier) are hashed from disk when it opens; whatever follows them is cut off."""

    def __init__(self, fh: AsyncFileIO, path: Path, hashes: Hashes, pool: ThreadPoolExecutor) -> None:
        self._fh: AsyncFileIO | None = fh
        self.path = path
        self.hashes = hashes
        self._pool = pool
        self.position = hashes.size  # bytes in the file, all written and hashed
        self.inode = os.fstat(fh.fileno()).st_ino

    @classmethod
    async def open(cls, path: Path, start: int, *, hashes: Hashes, pool: ThreadPoolExecutor) -> PartFile:
        fh = await _open(path, pool)
        try:
            while hashes.size < start:
                with anyio.CancelScope(shield=True):  # as `in_pool`: never closed under a read
                    chunk = await fh.read(min(READ_BYTES, start - hashes.size))
                if not chunk:
                    raise DownloadError(f"{path.name} ends at {hashes.size}, before the {start} bytes proven")
                await in_pool(pool, hashes.update, chunk)
            with anyio.CancelScope(shield=True):
                await fh.truncate(start)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await fh.close()
            raise
        return cls(fh, path, hashes, pool)

    async def write(self, block: memoryview) -> None:
        """All of `block` at the end, hashed beside the write; a full disk is `NoSpace` (the
        bytes before it stay good, and this file's hashes are then no longer used)."""
        assert self._fh is not None, "write after close"
        with anyio.CancelScope(shield=True):  # the block's buffer is reused once this returns
            hashing = asyncio.ensure_future(self.hashes.update_beside(block, self._pool))
            try:
                await _write_all(self._fh, block)
            finally:
                await hashing
        self.position += len(block)

    async def sync(self) -> None:
        assert self._fh is not None, "sync after close"
        await in_pool(self._pool, os.fdatasync, self._fh.fileno())

    async def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with anyio.CancelScope(shield=True):
                try:
                    await in_pool(self._pool, os.fsync, fh.fileno())
                finally:
                    await fh.close()


async def _write_all(fh: AsyncFileIO, block: memoryview) -> None:
    try:
        while block:
            written = await fh.write(block)
            block = block[written:]
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise NoSpace(f"the disk is full ({exc.strerror})") from exc
        raise


async def write_at(fh: AsyncFileIO, offset: int, block: memoryview) -> None:
    """All of `block` at `offset` of a file opened for this writer alone."""
    await fh.seek(offset)
    await _write_all(fh, block)


async def pump(
    body: aiohttp.StreamReader,
    sink: Callable[[memoryview], Awaitable[None]],
    *,
    block_bytes: int = BLOCK_BYTES,
    blocks: int = BLOCKS_PER_BODY,
    size: int | None = None,
) -> None:
    """Receive `body` into `blocks` reused buffers, handing each full block to `sink` while the
    next one fills. What arrived before a break is handed over too, then the break is raised.
    A body of known `size` that fits in one block (an image) is received whole and handed over once."""
    if size is not None and size <= block_bytes:
        await _pump_small(body, sink)
        return
    send_full, receive_full = anyio.create_memory_object_stream[tuple[bytearray, int]](blocks)
    send_free, receive_free = anyio.create_memory_object_stream[bytearray](blocks)
    for _ in range(blocks):
        send_free.send_nowait(bytearray(block_bytes))

    async def drain() -> None:
        async with receive_full:
            async for buf, filled in receive_full:
                await sink(memoryview(buf)[:filled])
                send_free.send_nowait(buf)

    broke: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            async with send_full:
                buf, filled = await receive_free.receive(), 0
                try:
                    async for piece in body.iter_any():
                        view = memoryview(piece)
                        while view:
                            take = min(len(view), block_bytes - filled)
                            buf[filled : filled + take] = view[:take]
                            filled, view = filled + take, view[take:]
                            if filled == block_bytes:
                                await send_full.send((buf, filled))
                                buf, filled = await receive_free.receive(), 0
                except (aiohttp.ClientError, TimeoutError) as exc:
                    broke = exc  # what arrived before the break is still written below
                if filled:
                    await send_full.send((buf, filled))
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        send_free.close()
        receive_free.close()
    if broke is not None:
        raise broke


async def _pump_small(body: aiohttp.StreamReader, sink: Callable[[memoryview], Awaitable[None]]) -> None:
    """`pump` of a body that fits in one block: no buffers to reuse, no task to run beside."""
    received = bytearray()
    broke: BaseException | None = None
    try:
        async for piece in body.iter_any():
            received += piece
    except (aiohttp.ClientError, TimeoutError) as exc:
        broke = exc
    if received:
        await sink(memoryview(received))
    if broke is not None:
        raise broke
