"""One result file to disk, called directly (`Downloader.fetch`), third part: what the storage
session itself promises. A body that stalls is abandoned after the read timeout and resumed;
one downloader never holds more than its connection limit open to storage; the bytes placed are
the bytes as stored, even when storage labels them gzip-encoded; progress starts at zero."""

from __future__ import annotations

import base64
import gzip
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from orchestrator.config import Timeouts
from orchestrator.models import Artifact, ArtifactKind
from orchestrator.sim import Simulator
from orchestrator.store.parts import MemoryPartLog
from orchestrator.transfer.file import Downloader

from .conftest import fast_sim, until
from .test_mutants_file import QUICK, SIZE, expected_sha, fetch, one_stream, served, sha, stored

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
DEFAULT_CONNECTIONS = 32  # Downloader's own default, the one every run uses


def open_connections(port: int) -> int:
    """Connections the kernel holds open (ESTABLISHED) on the server's side of `port`."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


async def test_a_stalled_body_is_abandoned_after_the_read_timeout_and_resumed(tmp_path: Path) -> None:
    """Storage stops sending mid-file: after `download_read_s` of silence the transfer is dropped and
    fetched again, instead of waiting on a dead stream (there is no total timeout to save it)."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, download_bytes_per_s=MiB)) as sim:
        artifact = stored(sim)

        async def unstall_after_first_request() -> None:
            await until(lambda: len(sim.ledger.downloads) >= 1)
            # The first answer keeps its pace (a pause of 1 s after each MiB); later ones go at full speed.
            sim.settings = replace(sim.settings, download_bytes_per_s=None)

        downloader = Downloader(timeouts=Timeouts(download_read_s=0.3), file_retry=QUICK, parallel_min_bytes=1 << 40)
        async with downloader, anyio.create_task_group() as tg:
            tg.start_soon(unstall_after_first_request)
            final = await fetch(downloader, artifact, tmp_path, MemoryPartLog())
        assert sha(final) == expected_sha(sim, artifact)
        got = served(sim)
        assert len(got) == 2, got  # the stalled answer was given up, a second one delivered the rest
        assert got[0][:2] == (0, 200)


async def test_one_downloader_never_opens_more_than_its_connection_limit_to_storage(tmp_path: Path) -> None:
    """40 slow ranges at once: storage sees at most 32 connections (the default limit), all of them used."""
    ranges, range_bytes = 40, 64 * 1024
    size = ranges * range_bytes
    # Each range then takes about 0.6 s: every range wants a connection at the same time.
    async with Simulator(fast_sim(checkpoint_bytes=size, download_bytes_per_s=range_bytes / 0.6)) as sim:
        artifact = stored(sim)
        port = int(sim.url.rsplit(":", 1)[1])
        peak = 0
        done = anyio.Event()

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, open_connections(port))
                await anyio.sleep(0.01)

        downloader = Downloader(
            file_retry=QUICK,
            range_retry=QUICK,
            parallel_min_bytes=MiB,
            range_bytes=range_bytes,
            connections_per_file=ranges,
        )
        async with downloader, anyio.create_task_group() as tg:
            tg.start_soon(watch)
            final = await fetch(downloader, artifact, tmp_path, MemoryPartLog())
            peak = max(peak, open_connections(port))  # kept alive in the pool until the downloader closes
            done.set()
        assert sha(final) == expected_sha(sim, artifact)
        assert len(served(sim)) == ranges
        assert peak == DEFAULT_CONNECTIONS


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def storage_serving(handler: Handler) -> AsyncIterator[str]:
    """A storage of the test's own on a real socket: the URL of its one object."""
    app = web.Application()
    app.router.add_get("/bucket/model.ckpt", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/bucket/model.ckpt"
    finally:
        await runner.cleanup()


async def test_a_file_storage_serves_gzip_encoded_is_placed_as_stored(tmp_path: Path) -> None:
    """Storage may keep an object gzip-encoded (`Content-Encoding: gzip`, as GCS does for such
    uploads); its size and md5 are of the stored bytes, so those are what is placed, not inflated."""
    data = b"a checkpoint in an older format " * 4000
    stored_bytes = gzip.compress(data, mtime=0)
    md5 = hashlib.md5(stored_bytes).digest()

    async def serve(request: web.Request) -> web.StreamResponse:
        headers = {
            "Content-Encoding": "gzip",
            "Content-Type": "application/octet-stream",
            "ETag": '"gz-1"',
            "x-goog-hash": "md5=" + base64.b64encode(md5).decode(),
        }
        return web.Response(body=stored_bytes, headers=headers)

    async with storage_serving(serve) as url:
        artifact = Artifact(
            name="model.ckpt", kind=ArtifactKind.CHECKPOINT, remote_id="ckp", url=url, size_bytes=len(stored_bytes)
        )
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, tmp_path, MemoryPartLog())
        assert final.read_bytes() == stored_bytes


async def test_progress_of_a_fresh_downloader_is_zero(tmp_path: Path) -> None:
    """Before any file, the progress display shows 0 bytes fetched; after one, exactly its size."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        async with one_stream() as downloader:
            assert downloader.bytes_fetched == 0
            await fetch(downloader, artifact, tmp_path, MemoryPartLog())
            assert downloader.bytes_fetched == SIZE
