"""One result file to disk, called directly (`Downloader.fetch`), fourth part: partial files of
earlier leases in a shared campaign, the free-space check at its exact edges (on a real, small
tmpfs), a connection storage never accepts, a part that vanishes while its resume is asked for,
the size from which one stream keeps a record, and the progress total while a file is fetched."""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from orchestrator.config import Timeouts
from orchestrator.errors import DownloadError, NoSpace, SpaceRefused
from orchestrator.models import Artifact, ArtifactKind
from orchestrator.sim import FaultKind, Simulator
from orchestrator.store.parts import MemoryPartLog
from orchestrator.transfer.file import RECORD_MIN_BYTES, Downloader, _epoch_of, _mb, free_space_margin

from .conftest import fast_sim, tmpfs_at
from .test_mutants_file import (
    QUICK,
    SIZE,
    SMALL,
    expected_sha,
    fetch,
    one_stream,
    parts_in,
    scripted,
    served,
    sha,
    stored,
)
from .test_mutants_file_2 import DISK_MB, free_bytes, small_disk  # noqa: F401 (small_disk is a fixture)
from .test_mutants_file_3 import storage_serving

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- partial files of earlier leases (a shared campaign names them `<name>.<epoch>.part`)


async def test_a_download_under_a_later_lease_removes_only_earlier_leases_partial_files(tmp_path: Path) -> None:
    """Lease 5 fetches the file: the parts of leases 3 and 4 (lost workers) go, its own file is
    placed; a later lease's part, the plain `.part`, other names and other files stay."""
    name = "model.safetensors"
    kept = [f"{name}.7.part", f"{name}.part", f"{name}.x.part", f"{name}.3.part.bak", "lora.safetensors.2.part"]
    for leftover in [f"{name}.3.part", f"{name}.4.part", *kept]:
        (tmp_path / leftover).write_bytes(b"old bytes")
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        log = MemoryPartLog()
        log.suffix = ".5.part"  # what a PostgreSQL campaign's part log says under lease epoch 5
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, tmp_path, log)
        assert sha(final) == expected_sha(sim, artifact)
    assert names_in(tmp_path) == sorted([name, *kept])


async def test_a_plain_part_suffix_removes_no_other_partial_file(tmp_path: Path) -> None:
    """SQLite and one-off downloads name the part `<name>.part`: numbered parts are not theirs to remove."""
    name = "model.safetensors"
    others = [f"{name}.1.part", f"{name}.9.part"]
    for leftover in others:
        (tmp_path / leftover).write_bytes(b"old bytes")
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        async with one_stream() as downloader:
            await fetch(downloader, artifact, tmp_path, MemoryPartLog())
    assert names_in(tmp_path) == sorted([name, *others])


async def test_a_part_of_this_very_lease_is_resumed_not_removed(tmp_path: Path) -> None:
    """Lease 5 broke off mid-file and tries again: its own `.5.part` and its proven prefix stay,
    and storage is asked only for the bytes after that prefix."""
    name = "model.safetensors"
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        job_id, remote_name = artifact.url.split("?")[0].split("/")[-2:]
        content = sim.service.content_of(
            next(c.file for c in sim.service.jobs[job_id].checkpoints if c.file.path.endswith(remote_name))
        )
        assert content is not None
        (tmp_path / f"{name}.5.part").write_bytes(b"".join(content.read(0, MiB)))
        log = MemoryPartLog()
        log.suffix = ".5.part"
        await log.start_over(SIZE)
        await log.prove(0, MiB)
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, tmp_path, log)
        assert sha(final) == expected_sha(sim, artifact)
        assert [start for start, _, _ in served(sim)] == [MiB]


async def test_a_disk_out_of_files_says_how_much_the_file_needs(tmp_path: Path) -> None:
    """The disk has room but no inode left: the part cannot even be made. The error is the
    file system's (not a write's), and the message still names what the file needs."""
    with tmpfs_at(tmp_path / "disk", DISK_MB, inodes=8) as disk:
        try:
            for n in range(100):
                (disk / f"filler-{n}").touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
            artifact = stored(sim)
            async with one_stream() as downloader:
                with pytest.raises(NoSpace) as caught:
                    await fetch(downloader, artifact, disk, MemoryPartLog())
    assert f"it needs {_mb(SIZE)} more, plus {_mb(free_space_margin(SIZE))} kept free" in str(caught.value)


def test_the_epoch_is_read_only_from_a_name_dot_digits_dot_part() -> None:
    assert _epoch_of("model.safetensors.12.part", "model.safetensors") == 12
    assert _epoch_of("model.safetensors.part", "model.safetensors") is None
    assert _epoch_of("model.safetensors.1x.part", "model.safetensors") is None
    assert _epoch_of("7.part", "7") is None
    assert _epoch_of("123", "model.safetensors") is None  # neither the name nor `.part` around it


# --- the free-space check at its exact edges


async def test_a_file_that_fits_exactly_with_its_margin_is_fetched(small_disk: Path) -> None:
    """The whole file plus its 1 MiB margin is exactly what is free: it is fetched, not refused
    (the one-byte-more case is refused: tests/test_mutants_file_2.py)."""
    free = free_bytes(small_disk)
    size = free - MiB
    assert free_space_margin(size) == MiB
    async with Simulator(fast_sim(checkpoint_bytes=size)) as sim:
        artifact = stored(sim)
        settings = {"parallel_min_bytes": MiB, "range_bytes": MiB, "connections_per_file": 2}
        async with Downloader(file_retry=QUICK, **settings) as downloader:  # type: ignore[arg-type]
            final = await fetch(downloader, artifact, small_disk, MemoryPartLog())
        assert sha(final) == expected_sha(sim, artifact)
    assert parts_in(small_disk) == []


async def test_a_part_one_byte_short_still_needs_its_margin_free(tmp_path: Path, small_disk: Path) -> None:
    """All but the last byte proven, less than the margin free: even one byte more to fetch asks
    for the margin, so it is refused before any request (only a complete part needs none)."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        async with one_stream() as downloader:
            whole = (await fetch(downloader, artifact, tmp_path / "first", MemoryPartLog())).read_bytes()
        part = small_disk / "model.safetensors.part"
        part.write_bytes(whole[: SIZE - 1])
        log = MemoryPartLog()
        await log.start_over(SIZE)
        await log.prove(0, SIZE - 1)
        with (small_disk / "someone-else.bin").open("wb") as fh:
            fh.write(b"\0" * (free_bytes(small_disk) - 512 * 1024))
        assert free_bytes(small_disk) < free_space_margin(SIZE)
        before = served(sim)
        async with one_stream() as downloader:
            with pytest.raises(SpaceRefused, match=r"needs 0\.0 MB more"):
                await fetch(downloader, artifact, small_disk, log)
        assert served(sim) == before
    assert part.read_bytes() == whole[: SIZE - 1]  # kept for a run with more room
    assert not (small_disk / "model.safetensors").exists()


# --- the storage session


async def test_a_connection_storage_never_accepts_gives_up_after_the_connect_timeout(tmp_path: Path) -> None:
    """Storage's listen queue is full, so the connection is never made: each attempt is abandoned
    after `connect_s` (no total timeout would end it) and the file is reported as not fetched."""
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(3):  # never accepted: they fill the queue, so later connections get no answer
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        artifact = Artifact(
            name="model.ckpt",
            kind=ArtifactKind.CHECKPOINT,
            remote_id="ckp",
            url=f"http://127.0.0.1:{port}/bucket/model.ckpt",
            size_bytes=SMALL,
        )
        downloader = Downloader(
            timeouts=Timeouts(connect_s=0.2), file_retry=replace(QUICK, attempts=2), parallel_min_bytes=1 << 40
        )
        async with downloader:
            with anyio.fail_after(3), pytest.raises(DownloadError) as caught:
                await downloader.fetch(artifact, tmp_path, _same(artifact), MemoryPartLog(), renew_margin_s=0.0)
        assert "gave up after 2 attempts" in str(caught.value)
        assert "ConnectionTimeoutError" in str(caught.value)
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def _same(artifact: Artifact) -> Callable[[], Awaitable[Artifact]]:
    async def renew() -> Artifact:
        return artifact

    return renew


# --- a part that vanishes while its resume is asked for (a later lease removed it)

DATA = bytes(range(256)) * 64  # 16 KiB
PROVEN = 4096


async def resumed_after_the_part_vanished(tmp_path: Path, answer_range: Callable[[], web.Response]) -> list[str]:
    """A part with `PROVEN` bytes proven; storage answers the resume with `answer_range()` after the
    part was removed under it, and the whole object (ETag "v2") to a request without `Range`.
    Returns the requests' Range headers; the file must be placed whole."""
    part = tmp_path / "model.ckpt.part"
    part.write_bytes(DATA[:PROVEN])
    log = MemoryPartLog()
    await log.start_over(len(DATA))
    await log.set_etag('"v1"')
    await log.prove(0, PROVEN)
    asked: list[str] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        asked.append(request.headers.get("Range", ""))
        if "Range" in request.headers:
            part.unlink()  # as a worker under a later lease does to this one's part
            return answer_range()
        return web.Response(body=DATA, headers={"ETag": '"v2"'})

    async with storage_serving(serve) as url:
        artifact = Artifact(
            name="model.ckpt", kind=ArtifactKind.CHECKPOINT, remote_id="ckp", url=url, size_bytes=len(DATA)
        )
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, tmp_path, log)
    assert final.read_bytes() == DATA
    assert not part.exists()
    return asked


async def test_an_object_changed_under_a_part_that_vanished_is_fetched_again(tmp_path: Path) -> None:
    """The resume's 206 has another ETag and the part is already gone: nothing to remove, the file
    is fetched again from its first byte."""

    def new_generation() -> web.Response:
        headers = {"ETag": '"v2"', "Content-Range": f"bytes {PROVEN}-{len(DATA) - 1}/{len(DATA)}"}
        return web.Response(status=206, body=DATA[PROVEN:], headers=headers)

    assert await resumed_after_the_part_vanished(tmp_path, new_generation) == [f"bytes={PROVEN}-", ""]


async def test_a_416_for_a_part_that_vanished_is_fetched_again(tmp_path: Path) -> None:
    """Storage refuses the resume (416) and the part is already gone: the file is fetched again."""

    def refused() -> web.Response:
        return web.Response(status=416, headers={"Content-Range": f"bytes */{len(DATA)}"})

    assert await resumed_after_the_part_vanished(tmp_path, refused) == [f"bytes={PROVEN}-", ""]


# --- the size from which one stream keeps a record


async def test_a_file_of_exactly_the_record_size_is_not_resumed_in_one_stream(tmp_path: Path) -> None:
    """One stream keeps a record only for files *larger* than 1 MiB: one of exactly 1 MiB, broken
    mid-way, is fetched again from byte 0 and leaves no record."""
    plan = scripted((FaultKind.RESET, 1, 600_000))
    async with Simulator(fast_sim(checkpoint_bytes=RECORD_MIN_BYTES, faults=plan)) as sim:
        artifact = stored(sim)
        assert artifact.size_bytes == RECORD_MIN_BYTES
        log = MemoryPartLog()
        async with one_stream(range_bytes=256 * 1024) as downloader:
            final = await fetch(downloader, artifact, tmp_path, log)
        assert sha(final) == expected_sha(sim, artifact)
        assert served(sim) == [(0, 200, "reset"), (0, 200, None)]
    assert await log.record() is None


async def test_a_small_file_leaves_a_fresh_part_log_without_a_record(tmp_path: Path) -> None:
    """A LoRA fetched whole: its part log never held a record, before or after."""
    async with Simulator(fast_sim()) as sim:
        artifact = stored(sim, lora=True)
        log = MemoryPartLog()
        assert await log.record() is None
        async with one_stream() as downloader:
            await fetch(downloader, artifact, tmp_path, log)
    assert await log.record() is None


# --- progress


async def test_the_progress_display_knows_the_size_of_a_file_being_fetched(tmp_path: Path) -> None:
    """While a file is fetched (here: while its URL is renewed), its transfer shows the file's size
    as the total, from which the display shows a share and an ETA."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        totals: list[int | None] = []
        async with one_stream() as downloader:

            async def renew() -> Artifact:
                totals.extend(t.total for t in downloader.transfers.values())
                return artifact

            with anyio.fail_after(30):
                # Every signed URL expires within a huge margin: it is renewed before the first request.
                await downloader.fetch(artifact, tmp_path, renew, MemoryPartLog(), renew_margin_s=1e9)
    assert totals == [SIZE]
