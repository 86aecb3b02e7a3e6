"""The figures in a full-disk message are the ones a user acts on: how much more the file
needs, the margin kept free, what is free, and what was already proven and is kept.

Runs on a real, small tmpfs (see test_disk_space.py; skipped where mounting needs root).
The expected figures are computed here from the proven spans in the state store.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import anyio
import pytest

from orchestrator.models import JobState
from orchestrator.sim import Simulator
from orchestrator.store import SqliteDb
from orchestrator.store.parts import PartRecord
from orchestrator.transfer.file import (
    FREE_SPACE_MARGIN_MAX_BYTES,
    FREE_SPACE_MARGIN_MIN_BYTES,
    _disk_full,
    free_space_margin,
)

from .conftest import fast_run, fast_sim
from .test_disk_space import DISK_MB, LEFT_FREE, SIZE, MiB, fill_when_started, run
from .test_disk_space import small_disk as small_disk  # the fixture: a job folder on its own 8 MiB disk
from .test_downloads import manifest

pytestmark = pytest.mark.anyio


def mb(n: int) -> str:
    """How the messages write a number of bytes (0.1 MB below 10 MB, whole MB above)."""
    return f"{n / 1e6:,.1f} MB" if n < 10_000_000 else f"{n / 1e6:,.0f} MB"


def free_figure(message: str) -> float:
    match = re.search(r"; ([\d,]+(?:\.\d)?) MB are free\. ", message)
    assert match, message
    return float(match.group(1).replace(",", ""))


@pytest.mark.parametrize(
    "path",
    [
        pytest.param({"parallel_min_bytes": 1 << 40}, id="one-stream"),
        pytest.param({"parallel_min_bytes": MiB, "connections_per_file": 2}, id="ranges"),
    ],
)
async def test_a_full_disk_message_gives_what_is_still_needed_and_what_is_kept(
    tmp_path: Path, small_disk: Path, path: dict[str, int]
) -> None:
    out = small_disk.parent
    settings = fast_run(settings={"range_bytes": MiB, **path})
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, download_bytes_per_s=2 * MiB)) as sim:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fill_when_started, small_disk, small_disk / "someone-else.bin")
            result = await run(sim, manifest(tmp_path, trainings=1, lora=False), out, settings)
    assert result.outcome.exit_code == 1
    assert result.outcome.counts == {JobState.DOWNLOADING: 1}
    store = SqliteDb(result.paths.state)
    try:
        record = store.part_record("t0", store.files("t0")[0].remote_id)
    finally:
        store.close()
    assert record is not None and record.size == SIZE
    proven = record.proven_bytes()
    assert MiB <= proven < SIZE
    message = next(p for p in result.outcome.problems if "filled up" in p)
    assert f"it needs {mb(SIZE - proven)} more, plus {mb(free_space_margin(SIZE))} kept free; " in message, message
    assert f"The {mb(proven)} already fetched and proven are kept" in message, message
    assert 0 <= free_figure(message) <= LEFT_FREE / 1e6


async def test_a_refused_file_states_every_figure_of_the_margin(tmp_path: Path, small_disk: Path) -> None:
    size = DISK_MB * MiB  # fits, but not with its margin
    async with Simulator(fast_sim(checkpoint_bytes=size)) as sim:
        result = await run(
            sim,
            manifest(tmp_path, trainings=1, lora=False),
            small_disk / "out",
            fast_run(settings={"download_rounds": 1}),
        )
    message = next(p for p in result.outcome.problems if "not enough free space" in p)
    expected = (
        f"needs {mb(size)} more, plus {mb(free_space_margin(size))} kept free (2% of the file, "
        f"at least {mb(FREE_SPACE_MARGIN_MIN_BYTES)}, at most {mb(FREE_SPACE_MARGIN_MAX_BYTES)}); "
    )
    assert expected in message, message
    assert "at most 67 MB); " in message, message  # a figure of 10 MB or more, in whole MB
    assert 0 < free_figure(message) <= round(DISK_MB * MiB / 1e6, 1)  # the disk holds no more


def test_a_full_disk_under_a_file_of_unknown_size_or_an_unreadable_folder_still_says_what_to_do(
    tmp_path: Path,
) -> None:
    """Images come without a size and one stream keeps no record of them: the message stands anyway."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    image = _disk_full(tmp_path, tmp_path / "0.png.part", None, None, full)
    assert str(image).startswith(f"{tmp_path} filled up while writing 0.png.part ({full}): ")
    assert "it needs more space than is free; " in str(image) and " MB are free. " in str(image)
    assert "The 0.0 MB already fetched and proven are kept" in str(image)
    assert str(image).endswith("free some space (or choose another --out), then run again to resume")
    # A record of another object (an older size) proves nothing about this one.
    other = PartRecord(size=SIZE + 1, etag=None, spans=((0, MiB),))
    resized = _disk_full(tmp_path, tmp_path / "a.part", SIZE, other, full)
    assert f"it needs {mb(SIZE)} more" in str(resized) and "The 0.0 MB already fetched" in str(resized)
    gone = tmp_path / "gone"  # the folder cannot be read: free space is not known
    unknown = _disk_full(gone, gone / "a.part", SIZE, None, full)
    assert f"it needs {mb(SIZE)} more, plus {mb(free_space_margin(SIZE))} kept free; an unknown amount are free" in str(
        unknown
    )
