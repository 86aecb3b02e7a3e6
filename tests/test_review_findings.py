"""Adversarial review of the merge 193f316..main: each test shows one finding (red on main).

- a ranged download whose `.part` disappears mid-way (a person's clean-up, another worker's
  `_drop_other_parts`) must never place a file whose bytes differ from the hashes it reports;
- an OSError in one range (a part that can no longer be opened, EIO, EMFILE) must reach the
  caller as the OSError the download stage handles, not as an ExceptionGroup that nobody catches;
- a finished job removed from the manifest keeps its job.json restored like any other;
- the live view tells an event as the event says it (events.py quotes values with spaces).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest

from orchestrator import live
from orchestrator.errors import DownloadError
from orchestrator.events import event
from orchestrator.models import Artifact, ArtifactKind, JobState
from orchestrator.sim import Simulator
from orchestrator.store.parts import MemoryPartLog
from orchestrator.transfer.file import Downloader
from orchestrator.transfer.verify import Fetched
from tests.conftest import cli_process, fast_sim, write
from tests.test_mutants_ranges import QUICK, RANGE, SIZE, stored_checkpoint

NAME = "model.ckpt"  # not .safetensors: no header check stands between the hashes and the rename


class PartTakenAway(MemoryPartLog):
    """Proven spans in memory; right after the first span is proven, the `.part` is removed
    (as a clean-up of `*.part`, or a newer lease's `_drop_other_parts`, does), and with
    `folder_instead` a folder takes its name."""

    def __init__(self, part: Path, *, folder_instead: bool = False) -> None:
        super().__init__()
        self.part, self.folder_instead, self.proofs = part, folder_instead, 0

    async def prove(self, offset: int, length: int) -> None:
        await super().prove(offset, length)
        self.proofs += 1
        if self.proofs == 1:
            self.part.unlink()
            if self.folder_instead:
                self.part.mkdir()


async def fetch_ranged(sim: Simulator, folder: Path, log: PartTakenAway) -> tuple[Fetched, bytes]:
    stored = await stored_checkpoint(sim)
    artifact = Artifact(name=NAME, kind=ArtifactKind.CHECKPOINT, remote_id="ckp_1", url=stored.url, size_bytes=SIZE)

    async def renew() -> Artifact:
        raise AssertionError("no URL expires here")

    async with Downloader(
        parallel_min_bytes=1, range_bytes=RANGE, connections_per_file=1, file_retry=QUICK, range_retry=QUICK
    ) as downloader:
        got = await downloader.fetch(artifact, folder, renew, log, renew_margin_s=0.0)
    return got, stored.body


@pytest.mark.anyio
async def test_a_part_removed_mid_download_is_never_placed_with_bytes_its_hashes_do_not_cover(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "out"
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, checkpoint_url_ttl_s=1e9)) as sim:
        try:
            got, body = await fetch_ranged(sim, folder, PartTakenAway(folder / f"{NAME}.part"))
        except (DownloadError, OSError):
            return  # refusing the file is right: nothing wrong was placed
    placed = (folder / NAME).read_bytes()
    # On main: the next range's open (O_CREAT) makes a new, empty part; the proofs are synced
    # on the old inode, the hashes come from the network, and the new file is renamed into place.
    assert got.sha256 == hashlib.sha256(body).hexdigest()
    assert hashlib.sha256(placed).hexdigest() == got.sha256, (
        f"placed {len(placed)} bytes, {placed[:RANGE].count(0)} of the first {RANGE} zero, reported as verified"
    )


@pytest.mark.anyio
async def test_an_os_error_in_one_range_reaches_the_caller_as_an_os_error_not_a_group(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, checkpoint_url_ttl_s=1e9)) as sim:
        # run/download.py's _fetch_file handles (DownloadError, OSError, ...): an ExceptionGroup
        # passes through it and ends the whole run for one file's I/O error.
        with pytest.raises((DownloadError, OSError)):
            await fetch_ranged(sim, folder, PartTakenAway(folder / f"{NAME}.part", folder_instead=True))


JOBS = ["g0", "g1", "g2"]


def manifest(folder: Path, jobs: list[str]) -> Path:
    lines = ["campaign: regen", "defaults:", "  image_gen: {num_samples: 1, width: 64, height: 64}", "jobs:"]
    lines += [f"- {{id: {j}, type: image_gen, base_model: stable-diffusion-v1-5, prompt: p {j}}}" for j in jobs]
    return write(folder / "regen.yaml", "\n".join(lines) + "\n")


def test_a_done_job_removed_from_the_manifest_has_its_job_json_restored_too(tmp_path: Path, threaded_sim: Any) -> None:
    out = tmp_path / "outputs" / "regen"
    with threaded_sim(fast_sim()) as sim:
        proc = cli_process(manifest(tmp_path, JOBS), sim)
        said, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, said
        kept = (out / "g2" / "job.json").read_bytes()
        sums = (out / "g2" / "SHA256SUMS").read_bytes()
        assert kept and sums
        (out / "g2" / "job.json").write_bytes(b"")  # what a power cut after the unsynced rename may leave
        (out / "g2" / "SHA256SUMS").write_bytes(b"")
        proc = cli_process(manifest(tmp_path, JOBS[:2]), sim)  # g2 is done, then removed from the manifest
        said, _ = proc.communicate(timeout=120)
    assert (out / "g2" / "SHA256SUMS").read_bytes() == sums, said
    assert (out / "g2" / "job.json").read_bytes() == kept, said


def test_the_live_view_tells_events_as_they_are_said() -> None:
    told = live._Events()  # the live view's own handler of the run's log records
    logger = logging.getLogger("orchestrator.review_probe")
    logger.addHandler(told)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        why = "lost a.png: the service no longer offers it"
        event(logger, "job.problem", job_id="bob", state=JobState.DOWNLOADING, reason=why)
        event(logger, "job.unknown_state", job_id="bob", state=JobState.QUEUED, remote_id="r1", remote_state="paused")
    finally:
        logger.removeHandler(told)
    problem, unknown = (text for _, text in told.records)
    assert problem == f"bob: {why}"  # main: 'bob: a.png: the service no longer offers it"' (first word lost)
    assert "paused" in unknown, unknown  # main: the store's state (queued), not the one the API reports
