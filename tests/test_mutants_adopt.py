"""Adoption by tag (run/adopt.py): which remote job a forgotten job takes, what the run says
about it (the `campaign.adopted` count, the warnings), and the copies it records.

Against the real simulator and a real state file; `adopt` is called as the resolve stage
calls it, before any job of the state was sent."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.api.client import ApiClient
from orchestrator.config import RetryPolicy, RunSettings
from orchestrator.manifest.load import Manifest, load_manifest, spec_fingerprint
from orchestrator.models import JobState, JobType
from orchestrator.run.adopt import TagWatch, adopt
from orchestrator.run.submit import _sent_body
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator
from orchestrator.sim.service import JobKind
from orchestrator.store import SqliteStore

from .conftest import fast_sim, write

QUICK = RetryPolicy(attempts=3, total_s=5.0, backoff_min_s=0.001, backoff_max_s=0.002)
MANIFEST = (
    "campaign: camp\njobs:\n"
    "- {id: d, type: dreambooth, instance_prompt: p, image_urls: [u], base_model: stable-diffusion-v1-5}\n"
    "- {id: i, type: image_gen, base_model: stable-diffusion-v1-5, prompt: q}\n"
)


@asynccontextmanager
async def fresh_state(tmp_path: Path, text: str = MANIFEST) -> AsyncIterator[tuple[Manifest, SqliteStore]]:
    """A state file that never saw the campaign: every job pending, none looked for yet."""
    manifest = load_manifest(write(tmp_path / "camp.yaml", text))
    store = await SqliteStore.open(tmp_path / "camp.db")
    try:
        await store.sync_manifest("camp", manifest.jobs, [spec_fingerprint(s) for s in manifest.jobs], time.time())
        yield manifest, store
    finally:
        await store.close()


async def send_as_ours(sim: Simulator, manifest: Manifest, job_id: str) -> str:
    """What an earlier run (whose state was lost) sent for this job: its body, our tag."""
    spec = manifest.by_id[job_id]
    async with ApiClient(sim.url, sim.api_key) as api:
        return await api.submit(spec.type, _sent_body(spec, manifest.campaign, None, False, None))


async def send_tagged(sim: Simulator, value: str) -> str:
    body: dict[str, Any] = {
        "prompt": value,
        "base_model": "stable-diffusion-v1-5",
        "tags": [{"key": "dreamlook-batch", "value": value}],
    }
    async with ApiClient(sim.url, sim.api_key) as api:
        return await api.submit(JobType.IMAGE_GEN, body)


async def run_adopt(sim: Simulator, store: SqliteStore, retry: RetryPolicy = QUICK) -> list[str]:
    now = time.time()
    async with ApiClient(sim.url, sim.api_key) as api:
        with anyio.fail_after(30):
            return await adopt(
                api,
                RunSettings(retry=retry),
                store,
                "camp",
                now=lambda: now,
                first_check=lambda job_type: now,
                watch=TagWatch(store, "camp"),
            )


@pytest.mark.anyio
async def test_jobs_of_two_types_held_by_the_service_are_adopted_counted_and_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Simulator(fast_sim()) as sim, fresh_state(tmp_path) as (manifest, store):
        held = {job_id: await send_as_ours(sim, manifest, job_id) for job_id in ("d", "i")}
        with caplog.at_level(logging.INFO, logger="orchestrator"):
            warnings = await run_adopt(sim, store)
        assert warnings == []  # a list with tags, read to the end: nothing to warn about
        for job_id, remote_id in held.items():
            row = await store.job(job_id)
            assert (row.state, row.remote_id, row.adoption_checked) == (JobState.QUEUED, remote_id, True)
        assert len(sim.ledger.jobs) == 2
    assert "campaign.adopted count=2 checked=2" in caplog.text


@pytest.mark.anyio
async def test_a_first_run_against_a_service_holding_nothing_warns_of_nothing(tmp_path: Path) -> None:
    async with Simulator(fast_sim()) as sim, fresh_state(tmp_path) as (_, store):
        assert await run_adopt(sim, store) == []
        assert all(r.state is JobState.PENDING and r.adoption_checked for r in await store.jobs())


@pytest.mark.anyio
async def test_a_job_sent_three_times_by_a_lost_state_takes_the_oldest_copy_and_records_the_others(
    tmp_path: Path,
) -> None:
    async with Simulator(fast_sim()) as sim, fresh_state(tmp_path) as (manifest, store):
        oldest, second, newest = [await send_as_ours(sim, manifest, "i") for _ in range(3)]
        await run_adopt(sim, store)
        row = await store.job("i")
        assert (row.state, row.remote_id) == (JobState.QUEUED, oldest)
        assert await store.duplicates() == {"i": (second, newest)}


@pytest.mark.anyio
async def test_copies_are_recorded_past_newer_jobs_of_other_campaigns_and_of_forgotten_jobs(tmp_path: Path) -> None:
    """The newest listed jobs carry another campaign's tag and the tag of a job no longer in the
    state: the copies of our job behind them are still seen and recorded."""
    async with Simulator(fast_sim()) as sim, fresh_state(tmp_path) as (manifest, store):
        oldest = await send_as_ours(sim, manifest, "i")
        copy = await send_as_ours(sim, manifest, "i")
        await send_tagged(sim, "camp/removed-from-the-manifest")
        await send_tagged(sim, "other-campaign/i")
        await run_adopt(sim, store)
        assert (await store.job("i")).remote_id == oldest
        assert await store.duplicates() == {"i": (copy,)}


@pytest.mark.anyio
async def test_a_job_sent_before_the_newest_2000_is_still_adopted(tmp_path: Path) -> None:
    """Adoption reads back 200 pages of 50, not the 40 of a reconciliation."""
    async with Simulator(fast_sim()) as sim, fresh_state(tmp_path) as (manifest, store):
        ours = await send_as_ours(sim, manifest, "i")
        for n in range(41 * 50):  # others' jobs, newer than ours: 41 full pages
            body = {"prompt": f"p{n}", "base_model": "stable-diffusion-v1-5"}
            sim.service.submit(JobKind.IMAGE_GEN, body, sim.now())
        await send_as_ours(sim, manifest, "d")
        assert await run_adopt(sim, store) == []
        assert (await store.job("i")).remote_id == ours
        assert sim.ledger.requests["list"] == 1 + 42  # one page of dreambooth jobs, 42 of image_gen


@pytest.mark.anyio
async def test_a_retried_adoption_read_is_logged_as_adoptions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    once = FaultPlan(script=(ScriptedFault(route=Route.LIST, kind=FaultKind.SERVER_ERROR, nth=1, count=1),))
    async with Simulator(fast_sim(faults=once)) as sim, fresh_state(tmp_path) as (_, store):
        with caplog.at_level(logging.INFO, logger="orchestrator"):
            assert await run_adopt(sim, store) == []
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("api.retry")]
    assert len(retries) == 1 and retries[0].startswith("api.retry what=adopt attempt=1 "), retries
