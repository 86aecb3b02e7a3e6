"""Downloads under hostile storage: each ends with the right bytes on disk or a clear
`lost`, never a wrong file."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.commands import RunResult
from orchestrator.config import FILE_RETRY, RunSettings
from orchestrator.models import JobState
from orchestrator.sim import FaultPlan, FaultRates, Simulator

from .campaigns import assert_campaign_on_disk
from .conftest import FAST_SCALE, fast_run, fast_sim, write

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


def manifest(folder: Path, trainings: int = 0, images: int = 0, *, lora: bool = True, samples: int = 2) -> Path:
    lines = ["campaign: dl", "jobs:"]
    extract = "original" if lora else "disabled"
    for i in range(trainings):
        lines.append(
            f"- {{id: t{i}, type: dreambooth, instance_prompt: p, image_urls: [u], base_model: stable-diffusion-v1-5,"
            f" extract_lora: {extract}}}"
        )
    for i in range(images):
        lines.append(
            f"- {{id: g{i}, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5, num_samples: {samples}}}"
        )
    return write(folder / "dl.yaml", "\n".join(lines) + "\n")


async def run(sim: Simulator, path: Path, settings: RunSettings, *, once: bool = False) -> RunResult:
    m = load_manifest(path)
    key = write(path.parent / "key", sim.api_key)
    request = RunRequest(
        manifest=m, paths=paths_for(m), settings=settings, api_url=sim.url, api_key_file=key, once=once
    )
    with anyio.fail_after(120):
        return await run_campaign(request)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_resets_truncations_and_ignored_ranges_still_give_the_right_bytes(tmp_path: Path) -> None:
    rates = FaultRates(reset_download=0.2, truncate_download=0.15, ignore_range=0.1)
    # Retention far off: network backoffs are real seconds; deletion is the retention test's subject.
    sim_settings = fast_sim(seed=11, checkpoint_bytes=3 * MiB + 13, retention_s=1e9, faults=FaultPlan(rates=rates))
    run_settings = fast_run(
        settings={
            "parallel_min_bytes": 1 * MiB,
            "range_bytes": 256 * 1024,
            "file_retry": replace(FILE_RETRY, attempts=15),
        }
    )
    path = manifest(tmp_path, trainings=8, images=8)
    async with Simulator(sim_settings) as sim:
        result = await run(sim, path, run_settings)
        assert result.outcome.exit_code == 0, result.outcome.problems
        assert_campaign_on_disk(sim, result.paths.out, "dl", [f"t{i}" for i in range(8)] + [f"g{i}" for i in range(8)])
        faults = Counter(d.fault for d in sim.ledger.downloads)
        ranged = [d for d in sim.ledger.downloads if d.status == 206 and d.end - d.start == 256 * 1024]
    # Every kind of fault really happened, and the big files really went in ranges.
    assert faults["reset"] and faults["truncate"] and faults["ignore-range"] and ranged
    assert not [p for p in files_under(tmp_path) if p.suffix == ".part"]


async def test_urls_that_expire_while_waiting_for_a_slot_are_renewed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Image URLs live 0.5 real seconds; each ~270-byte image takes ~0.13 s through one slot: 24 images.
    sim_settings = fast_sim(image_url_ttl_s=0.5 * FAST_SCALE, download_bytes_per_s=2_000.0)
    path = manifest(tmp_path, images=6, samples=4)
    async with Simulator(sim_settings) as sim:
        with caplog.at_level(logging.INFO, logger="orchestrator"):
            result = await run(sim, path, fast_run(max_downloads=1))
        assert result.outcome.exit_code == 0, result.outcome.problems
        assert_campaign_on_disk(sim, result.paths.out, "dl", [f"g{i}" for i in range(6)])
    assert any("download.url_renewed" in r.getMessage() for r in caplog.records)


async def test_retention_passing_before_download_makes_the_job_lost(tmp_path: Path) -> None:
    sim_settings = fast_sim(retention_s=0.2 * FAST_SCALE)  # files deleted 0.2 s after training
    path = manifest(tmp_path, trainings=2)
    async with Simulator(sim_settings) as sim:
        first = await run(sim, path, fast_run(), once=True)  # submits
        assert first.outcome.counts == {JobState.QUEUED: 2}
        await anyio.sleep(1.0)  # cron comes back too late
        second = await run(sim, path, fast_run(), once=True)
    assert second.outcome.counts == {JobState.LOST: 2}
    assert second.outcome.exit_code == 1
    assert sum("lost" in p for p in second.outcome.problems) == 4  # checkpoint and LoRA of each
    out = second.paths.out
    assert [p.name for p in files_under(out) if p.parent != out] == ["SHA256SUMS", "job.json"] * 2
    assert (out / "t0" / "SHA256SUMS").read_text() == ""


async def test_hostile_file_names_stay_inside_the_output_folder(tmp_path: Path) -> None:
    # Checkpoints named `..%2F..%2F%0Aevil%01...`; each job's first image named `...` (dots only).
    path = manifest(tmp_path, trainings=2, images=2)
    jobs = ("t0", "t1", "g0", "g1")
    async with Simulator(fast_sim(hostile_names=True)) as sim:
        result = await run(sim, path, fast_run())
        assert result.outcome.exit_code == 0, result.outcome.problems
        remote = {e.tags[0]["value"].split("/")[1]: e.job_id for e in sim.ledger.jobs}
        expected = {job: sorted(sim.expected_files(remote[job]).values()) for job in jobs}
        assert all("..." in sim.expected_files(remote[job]) for job in ("g0", "g1"))
    out = result.paths.out
    outside = [p for p in files_under(tmp_path) if out not in p.parents and p.parent.name != ".dreamlook-batch"]
    assert sorted(p.name for p in outside) == ["dl.yaml", "key"]
    for job in jobs:
        names = sorted(p.name for p in (out / job).iterdir() if p.name not in ("job.json", "SHA256SUMS"))
        assert all(n.isprintable() and not n.startswith(".") and "/" not in n for n in names), names
        got = sorted(hashlib.sha256((out / job / n).read_bytes()).hexdigest() for n in names)
        assert got == expected[job]


async def test_a_file_larger_than_the_free_space_is_refused_clearly(tmp_path: Path) -> None:
    path = manifest(tmp_path, trainings=1, lora=False)
    petabyte = 10**15  # the simulator makes bytes lazily: offering this costs nothing
    async with Simulator(fast_sim(checkpoint_bytes=petabyte)) as sim:
        result = await run(sim, path, fast_run(settings={"download_rounds": 1}))
        served = list(sim.ledger.downloads)
    assert result.outcome.exit_code == 1
    assert any("not enough free space" in p and "Free some space" in p for p in result.outcome.problems)
    assert served == []  # refused before a byte was asked for
    folder = result.paths.out / "t0"
    assert not folder.exists() or not list(folder.glob("*.safetensors*"))  # nothing was written
