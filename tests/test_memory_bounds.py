"""What the engine keeps in memory is bounded by the work in hand, not by the campaign:
job objects are dropped when their job ends, and a problem found again is not listed again.
(Peak RSS of a 100,000-job run is measured by `make bench`, not asserted here.)"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import JobState
from orchestrator.run.engine import Engine
from orchestrator.sim import FaultPlan, FaultRates, Simulator
from orchestrator.store import SqliteDb

from .conftest import fast_run, fast_sim, until, write

pytestmark = pytest.mark.anyio
JOBS = 60


def campaign(folder: Path, count: int, name: str = "mem") -> Path:
    lines = [f"campaign: {name}", "jobs:"]
    lines += [
        f"- {{id: g{i:03d}, type: image_gen, prompt: p{i}, base_model: stable-diffusion-v1-5, num_samples: 1}}"
        for i in range(count)
    ]
    return write(folder / f"{name}.yaml", "\n".join(lines) + "\n")


def watching(engines: list[Engine]) -> Any:
    def watch(engine: Engine) -> contextlib.AbstractAsyncContextManager[None]:
        engines.append(engine)
        return contextlib.nullcontext()

    return watch


async def test_job_objects_are_dropped_when_their_jobs_end(tmp_path: Path) -> None:
    manifest = load_manifest(campaign(tmp_path, JOBS))
    engines: list[Engine] = []
    seen_at_once = 0
    # Some jobs fail at the service: their objects must be dropped too, not only those of done jobs.
    sim_settings = fast_sim(faults=FaultPlan(rates=FaultRates(job_failure=0.3)), seed=4)
    async with Simulator(sim_settings) as sim:
        key = write(tmp_path / "key", sim.api_key)
        request = RunRequest(
            manifest=manifest,
            paths=paths_for(manifest),
            # One GET per check (no job list): every object then passes through the cache.
            settings=fast_run(max_active=20, max_downloads=4, settings={"batch_status": False}),
            api_url=sim.url,
            api_key_file=key,
            watch=watching(engines),
        )
        result: list[Any] = []

        async def run() -> None:
            result.append(await run_campaign(request))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(120):
                while not result:  # how many job objects it holds while the campaign runs
                    if engines:
                        seen_at_once = max(seen_at_once, len(engines[0].ctx.jobs))
                    await anyio.sleep(0.001)
    counts = result[0].outcome.counts
    engine = engines[0]
    assert counts.get(JobState.FAILED) and counts.get(JobState.DONE), counts  # both endings were taken
    assert sum(counts.values()) == JOBS
    assert seen_at_once > 0  # the cache was used (a cache that is never filled proves nothing)
    assert len(engine.ctx.jobs) == 0  # every job ended: none of their objects is kept
    assert engine.fetch.prepared == set() and not any(engine.fetch.queued_per_job.values())


async def test_a_job_the_api_does_not_know_is_reported_once_however_often_it_is_checked(tmp_path: Path) -> None:
    manifest = load_manifest(campaign(tmp_path, 1, "ghost"))
    paths = paths_for(manifest)
    store = SqliteDb(paths.state)  # a job whose recorded id the service never made
    now = time.time()
    store.sync_manifest("ghost", manifest.jobs, [spec_fingerprint(s) for s in manifest.jobs], now)
    store.record_intents([("g000", "{}", spec_fingerprint(manifest.jobs[0]))], now)
    store.mark_submitted("g000", "no-such-job", now, next_check_at=now)
    store.close()
    engines: list[Engine] = []
    async with Simulator(fast_sim()) as sim:
        key = write(tmp_path / "key", sim.api_key)
        request = RunRequest(
            manifest=manifest,
            paths=paths,
            settings=fast_run(),
            api_url=sim.url,
            api_key_file=key,
            watch=watching(engines),
        )

        async def stop_after_rechecks() -> None:
            await until(lambda: sim.ledger.requests["get"] >= 5, timeout_s=60)
            engines[0].stop()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_after_rechecks)
            with anyio.fail_after(60):
                result = await run_campaign(request)
        gets = sim.ledger.requests["get"]
    assert gets >= 5  # it was looked at again and again
    said = [p for p in result.outcome.problems if "does not exist" in p]
    assert said == ["g000: the API says job no-such-job does not exist; will check again"]
