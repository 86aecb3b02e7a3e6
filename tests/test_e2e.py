"""Issue 3's end-to-end runs: a 300-job mixed campaign with dependencies, continuous and
by cron-style `--once` passes; and `--dry-run`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.cli import main
from orchestrator.models import JobState
from orchestrator.sim import Simulator

from .campaigns import assert_campaign_on_disk, mixed_manifest
from .conftest import fast_run, fast_sim, write

pytestmark = pytest.mark.anyio


def key_file(folder: Path, sim: Simulator) -> Path:
    return write(folder / "key", sim.api_key + "\n")


async def status_json(manifest: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`status --json` as a user runs it: the command, on a thread of its own (it runs its own event loop)."""
    capsys.readouterr()
    assert await anyio.to_thread.run_sync(main, ["status", str(manifest), "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def selected_kinds(out: Path, job_id: str) -> set[str]:
    names = [line.split("  ", 1)[1] for line in (out / job_id / "SHA256SUMS").read_text().splitlines()]
    return {"image" if n.endswith(".png") else "lora" if "_lora_" in n else "checkpoint" for n in names}


@pytest.mark.broad  # left out of `make mutants` (time): see bench/MUTANTS.md
async def test_300_job_mixed_campaign_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = mixed_manifest(tmp_path)
    manifest = load_manifest(path)
    assert len(manifest.jobs) == 300
    async with Simulator(fast_sim(seed=3)) as sim:
        request = RunRequest(
            manifest=manifest,
            paths=paths_for(manifest),
            settings=fast_run(),
            api_url=sim.url,
            api_key_file=key_file(tmp_path, sim),
        )
        with anyio.fail_after(120):
            result = await run_campaign(request)
        assert result.outcome.exit_code == 0, result.outcome.problems
        files = assert_campaign_on_disk(sim, result.paths.out, "mixed", [j.id for j in manifest.jobs])
    # 80 trainings (1/3 LoRA only) + 80 x 2 images + 60 x (checkpoint + 1 image) + 80 x 2 images
    assert files == (27 * 1 + 53 * 2) + 160 + 120 + 160
    assert selected_kinds(result.paths.out, "t000") == {"lora"}
    assert selected_kinds(result.paths.out, "t001") == {"checkpoint", "lora"}
    assert selected_kinds(result.paths.out, "c000") == {"checkpoint", "image"}
    status = await status_json(path, capsys)
    assert status["done"] is True and status["counts"] == {"done": 300}
    summary = json.loads((result.paths.out / "summary.json").read_text())
    assert summary["counts"] == {"done": 300} and len(summary["jobs"]) == 300


async def test_the_same_campaign_by_cron_style_once_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = mixed_manifest(tmp_path, trainings=40, combined=20, plain_images=40)
    manifest = load_manifest(path)
    async with Simulator(fast_sim(seed=4)) as sim:
        request = RunRequest(
            manifest=manifest,
            paths=paths_for(manifest),
            settings=fast_run(max_active=50),
            api_url=sim.url,
            api_key_file=key_file(tmp_path, sim),
            once=True,
        )
        passes = 0
        with anyio.fail_after(120):
            while True:
                passes += 1
                result = await run_campaign(request)
                assert result.outcome.exit_code == 0, result.outcome.problems
                if result.outcome.counts == {JobState.DONE: 140}:
                    break
                await anyio.sleep(0.05)  # cron's minute, time-scaled
        assert passes > 3  # with max_active=50 it cannot have been one pass
        assert_campaign_on_disk(sim, result.paths.out, "mixed", [j.id for j in manifest.jobs])
        assert (await status_json(path, capsys))["done"] is True
        # One more pass, as cron will keep running us: nothing is sent.
        before = dict(sim.ledger.requests)
        result = await run_campaign(request)
        assert result.outcome.exit_code == 0 and dict(sim.ledger.requests) == before


async def test_dry_run_submits_each_job_once_and_polls_nothing(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dry.yaml",
        """
defaults: {dreambooth: {base_model: stable-diffusion-v1-5, image_urls: [u], instance_prompt: p}}
jobs:
  - {id: a, type: dreambooth}
  - {id: b, type: dreambooth, steps: 500}
  - {id: wrong-model, type: dreambooth, base_model: sd-9000}
  - {id: imgs, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5}
  - {id: from-a, type: image_gen, prompt: p, checkpoint_from: a}
""",
    )
    manifest = load_manifest(path)
    async with Simulator(fast_sim()) as sim:
        request = RunRequest(
            manifest=manifest,
            paths=paths_for(manifest),
            settings=fast_run().__class__(dry_run=True),
            api_url=sim.url,
            api_key_file=key_file(tmp_path, sim),
        )
        result = await run_campaign(request)
        assert sim.ledger.jobs == []
        assert dict(sim.ledger.requests) == {"submit": 4}  # no GET, no list, no download
    counts = result.outcome.counts
    assert counts == {JobState.DRY_RUN_OK: 3, JobState.INVALID: 1, JobState.SKIPPED: 1}
    assert any(p.startswith("wrong-model: invalid: base_model: unknown base_model") for p in result.outcome.problems)
    assert result.outcome.exit_code == 1  # a payload was refused
    assert not result.paths.state.exists() and not result.paths.out.exists()
