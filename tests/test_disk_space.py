"""A disk that fills up mid-download (a real, small tmpfs), and the free-space check before one.

The run must end with a message saying where and how much space is needed, keep the
`.part` and the job `downloading`, and a rerun with room must finish with the right bytes.
Mounting needs root: elsewhere these tests are skipped, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.commands import RunResult
from orchestrator.config import RunSettings
from orchestrator.models import JobState
from orchestrator.sim import Simulator
from orchestrator.store import SqliteDb
from orchestrator.transfer.file import free_space_margin

from .campaigns import assert_campaign_on_disk
from .conftest import fast_run, fast_sim, tmpfs_at, write
from .test_downloads import manifest

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
SIZE = 6 * MiB + 7
DISK_MB = 8
LEFT_FREE = 512 * 1024  # what the other writer leaves: the download runs out of room soon after


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """The job's folder `out/t0` on a disk of its own (the campaign's summary.json stays off it)."""
    with tmpfs_at(tmp_path / "out" / "t0", DISK_MB) as disk:
        yield disk


async def run(sim: Simulator, path: Path, out: Path, settings: RunSettings) -> RunResult:
    m = load_manifest(path)
    key = write(path.parent / "key", sim.api_key)
    request = RunRequest(manifest=m, paths=paths_for(m, out=out), settings=settings, api_url=sim.url, api_key_file=key)
    with anyio.fail_after(120):
        return await run_campaign(request)


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def part_on_disk(disk: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in disk.glob("*.part"))


def fill(disk: Path, filler: Path) -> None:
    with filler.open("wb") as fh:
        fh.write(b"\0" * (free_bytes(disk) - LEFT_FREE))


async def fill_when_started(disk: Path, filler: Path) -> None:
    """Another writer takes all but LEFT_FREE of the disk once 1.5 MiB of the part are on it."""
    with anyio.fail_after(60):
        while True:
            if await anyio.to_thread.run_sync(part_on_disk, disk) >= 3 * MiB // 2:
                break
            await anyio.sleep(0.02)
    await anyio.to_thread.run_sync(fill, disk, filler)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param({"parallel_min_bytes": 1 << 40}, id="one-stream"),
        pytest.param({"parallel_min_bytes": MiB, "connections_per_file": 2}, id="ranges"),
    ],
)
async def test_a_disk_that_fills_up_mid_download_keeps_the_part_and_says_what_is_needed(
    tmp_path: Path, small_disk: Path, path: dict[str, int]
) -> None:
    out = small_disk.parent
    filler = small_disk / "someone-else.bin"
    settings = fast_run(settings={"range_bytes": MiB, **path})
    job_manifest = manifest(tmp_path, trainings=1, lora=False)
    # 2 MiB/s per connection: the file takes seconds, the other writer fills the disk in milliseconds.
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, download_bytes_per_s=2 * MiB)) as sim:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fill_when_started, small_disk, filler)
            first = await run(sim, job_manifest, out, settings)
        assert first.outcome.exit_code == 1
        message = next(p for p in first.outcome.problems if "filled up" in p)
        assert str(out / "t0") in message and "needs" in message and "free some space" in message, message
        assert "Traceback" not in message
        assert first.outcome.counts == {JobState.DOWNLOADING: 1}
        assert [p.name for p in (out / "t0").iterdir() if p.suffix == ".part"], "the part is kept"
        store = SqliteDb(first.paths.state)
        try:
            record = store.part_record("t0", store.files("t0")[0].remote_id)
        finally:
            store.close()
        assert record is not None and record.proven_bytes() >= MiB  # what was written before is kept
        served_before = len(sim.ledger.downloads)

        filler.unlink()
        second = await run(sim, job_manifest, out, settings)
        assert second.outcome.exit_code == 0, second.outcome.problems
        assert_campaign_on_disk(sim, out, "dl", ["t0"])
        fetched = sum(d.end - d.start for d in sim.ledger.downloads[served_before:])
    assert fetched == SIZE - record.proven_bytes()  # resumed: the proven bytes were not fetched again


async def test_a_file_larger_than_the_free_space_is_refused_clearly(tmp_path: Path, small_disk: Path) -> None:
    size = DISK_MB * MiB  # fits, but not with its margin
    async with Simulator(fast_sim(checkpoint_bytes=size)) as sim:
        result = await run(
            sim,
            manifest(tmp_path, trainings=1, lora=False),
            small_disk / "out",
            fast_run(settings={"download_rounds": 1}),
        )
        served = list(sim.ledger.downloads)
    assert result.outcome.exit_code == 1
    message = next(p for p in result.outcome.problems if "not enough free space" in p)
    margin_mb = f"{free_space_margin(size) / 1e6:,.1f} MB"
    assert f"plus {margin_mb} kept free" in message and "Free some space" in message, message
    assert served == []  # refused before a byte was asked for


async def test_a_small_file_needs_only_a_small_margin(tmp_path: Path, small_disk: Path) -> None:
    """A fixed 64 MiB margin once refused a 0.5 MB file with 21 MB free; the margin follows the file."""
    size = 3 * MiB + 13
    assert free_space_margin(size) < 2 * MiB
    async with Simulator(fast_sim(checkpoint_bytes=size)) as sim:
        result = await run(sim, manifest(tmp_path, trainings=1, lora=False), small_disk.parent, fast_run())
        assert result.outcome.exit_code == 0, result.outcome.problems
        assert_campaign_on_disk(sim, small_disk.parent, "dl", ["t0"])
