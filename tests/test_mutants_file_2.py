"""One result file to disk, called directly (`Downloader.fetch`) against the real simulator's
storage (second part): URLs renewed before use, folders made with their parents, the free-space
check at its edges (on a real, small tmpfs), ranges or one stream, the progress total over
several files, and errors that are not a full disk. Each test states what a user would see."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import NoSpace, SpaceRefused
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator
from orchestrator.store.parts import MemoryPartLog
from orchestrator.transfer.file import IO_THREADS, Downloader, free_space_margin

from .conftest import fast_sim, tmpfs_at
from .test_mutants_file import QUICK, SIZE, expected_sha, fetch, one_stream, parts_in, served, sha, stored

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
DISK_MB = 8


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a disk of its own: a real 8 MiB tmpfs (mounting needs root: skipped elsewhere)."""
    with tmpfs_at(tmp_path / "disk", DISK_MB) as disk:
        yield disk


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


async def test_a_url_already_expired_is_renewed_before_storage_sees_it(tmp_path: Path) -> None:
    """The job's URL died while the file waited: it is renewed first, so no request is refused."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        fresh = stored(sim)
        ckp = next(c for j in sim.service.jobs.values() for c in j.checkpoints if c.checkpoint_id == fresh.remote_id)
        dead = replace(fresh, url=sim.renderer.url(ckp.file, sim.now() - ckp.file.ttl_s - 10))
        async with one_stream() as downloader:
            final = await fetch(downloader, dead, tmp_path, MemoryPartLog(), renew=fresh)
        assert sim.ledger.requests[Route.DOWNLOAD] == 1  # the dead URL was never sent
        assert served(sim) == [(0, 200, None)]
        assert sha(final) == expected_sha(sim, fresh)


async def test_a_folder_whose_parents_are_gone_is_made_with_them(tmp_path: Path) -> None:
    """`--out` removed while a run waited on its jobs: the job's folder is made again, parents too."""
    folder = tmp_path / "out" / "job"
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, folder, MemoryPartLog())
        assert final == folder / "model.safetensors" and sha(final) == expected_sha(sim, artifact)


async def test_a_folder_that_is_a_file_is_not_reported_as_a_full_disk(tmp_path: Path) -> None:
    """An error of the file system that is not a full disk goes up as it is, not as "filled up"."""
    folder = tmp_path / "job"
    folder.write_bytes(b"not a folder")
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        async with one_stream() as downloader:
            with pytest.raises(OSError) as caught:
                await fetch(downloader, artifact, folder, MemoryPartLog())
        assert served(sim) == []
    assert not isinstance(caught.value, NoSpace) and isinstance(caught.value, FileExistsError), caught.value
    assert "filled up" not in str(caught.value)


async def test_a_fully_proven_part_is_placed_even_when_less_than_the_margin_is_free(small_disk: Path) -> None:
    """Killed before the rename, then the disk filled up: the part needs no more byte, so no free
    space is asked for; it is checked and placed without a request."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        log = MemoryPartLog()
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, small_disk, log)
            final.rename(final.with_name(final.name + ".part"))  # as if killed before the rename
            with (small_disk / "someone-else.bin").open("wb") as fh:
                fh.write(b"\0" * (free_bytes(small_disk) - 256 * 1024))
            assert free_bytes(small_disk) < free_space_margin(SIZE)
            before = served(sim)
            again = await fetch(downloader, artifact, small_disk, log)
        assert served(sim) == before
        assert again == final and sha(final) == expected_sha(sim, artifact)
    assert parts_in(small_disk) == []


async def test_a_file_one_byte_short_of_room_with_its_margin_is_refused_before_any_request(small_disk: Path) -> None:
    """Over ranges with nothing proven, the whole file and its margin must fit: one byte less is refused."""
    free = free_bytes(small_disk)
    size = free - MiB + 1  # the file plus its 1 MiB margin: one byte more than is free
    assert free_space_margin(size) == MiB
    async with Simulator(fast_sim(checkpoint_bytes=size)) as sim:
        artifact = stored(sim)
        settings = {"parallel_min_bytes": MiB, "range_bytes": MiB, "connections_per_file": 2}
        async with Downloader(file_retry=QUICK, **settings) as downloader:  # type: ignore[arg-type]
            with pytest.raises(SpaceRefused, match="not enough free space"):
                await fetch(downloader, artifact, small_disk, MemoryPartLog())
        assert served(sim) == []
    assert parts_in(small_disk) == []


async def test_the_progress_total_adds_up_every_file_fetched(tmp_path: Path) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        checkpoint, lora = stored(sim), stored(sim, lora=True)
        assert lora.size_bytes is not None
        async with one_stream() as downloader:
            await fetch(downloader, checkpoint, tmp_path / "a", MemoryPartLog())
            await fetch(downloader, lora, tmp_path / "b", MemoryPartLog())
            assert downloader.bytes_fetched == SIZE + lora.size_bytes


async def test_a_file_of_exactly_parallel_min_bytes_goes_over_ranges(tmp_path: Path) -> None:
    """`--parallel-min-mb`: files of that size *or more* are fetched in ranges."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        settings = {"parallel_min_bytes": SIZE, "range_bytes": MiB, "connections_per_file": 1}
        async with Downloader(file_retry=QUICK, **settings) as downloader:  # type: ignore[arg-type]
            final = await fetch(downloader, artifact, tmp_path, MemoryPartLog())
        assert served(sim) == [(0, 206, None), (MiB, 206, None), (2 * MiB, 206, None), (3 * MiB, 206, None)]
        assert sha(final) == expected_sha(sim, artifact)


async def test_a_storage_that_never_honours_range_still_delivers_the_file_over_one_stream(tmp_path: Path) -> None:
    """Every answer is a 200 with the whole file: after the first, the file comes in one stream."""
    plan = FaultPlan(script=(ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.IGNORE_RANGE, nth=1, count=1000),))
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, faults=plan)) as sim:
        artifact = stored(sim)
        settings = {"parallel_min_bytes": MiB, "range_bytes": MiB, "connections_per_file": 1}
        async with Downloader(file_retry=QUICK, range_retry=QUICK, **settings) as downloader:  # type: ignore[arg-type]
            final = await fetch(downloader, artifact, tmp_path, MemoryPartLog())
        assert [(status, fault) for _, status, fault in served(sim)] == [(200, "ignore-range")] * 2
        assert sha(final) == expected_sha(sim, artifact)


def io_threads() -> set[int]:
    """Threads that may touch files: the downloads' pool, and anyio's (the loop's own resolve host names)."""
    names = ("dreamlook-io", "AnyIO worker thread")
    return {t.ident or 0 for t in threading.enumerate() if t.name.startswith(names)}


async def test_many_files_in_one_stream_at_once_share_a_few_io_threads(tmp_path: Path) -> None:
    """Writes, syncs and placing of 16 files fetched at once share the downloader's few I/O threads."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifacts = [stored(sim) for _ in range(16)]
        before = io_threads()
        async with one_stream() as downloader:
            async with anyio.create_task_group() as tg:
                for i, artifact in enumerate(artifacts):
                    tg.start_soon(fetch, downloader, artifact, tmp_path / str(i), MemoryPartLog())
        for i, artifact in enumerate(artifacts):
            assert sha(tmp_path / str(i) / "model.safetensors") == expected_sha(sim, artifact)
    assert len(io_threads() - before) <= IO_THREADS
