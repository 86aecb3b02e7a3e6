"""The submit stage, seen by a user: --max-new-jobs and --max-active are kept, a slow answer
holds one slot and not the campaign, the grace window of a POST is recorded as it leaves,
a 422 keeps the API's reason, a job's own tags are sent beside the campaign tag, the first
status look waits for the poll policy.

Real simulator, real SQLite files, the engine driven in-process (or through `run_campaign`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.api.budget import RequestBudget
from orchestrator.api.client import ApiClient
from orchestrator.config import PollPolicy, RunSettings, Timeouts
from orchestrator.manifest.load import Manifest
from orchestrator.models import JobState
from orchestrator.run.engine import IDLE_WAKE_S, Engine
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator
from orchestrator.store import JobRow, SqliteStore
from orchestrator.transfer.file import Downloader

from .conftest import fast_run, fast_sim, until, write

pytestmark = pytest.mark.anyio

# A run that never ends fails the test at this bound; a passing run takes well under a second.
HANG_S = 15.0


def images(folder: Path, count: int, *, extra: str = "") -> Manifest:
    lines = ["campaign: sub", "jobs:"]
    lines += [
        f"- {{id: j{i}, type: image_gen, prompt: p{i}, base_model: stable-diffusion-v1-5{extra}}}" for i in range(count)
    ]
    return load_manifest(write(folder / "sub.yaml", "\n".join(lines) + "\n"))


async def campaign(tmp_path: Path, sim: Simulator, manifest: Manifest, settings: RunSettings) -> int:
    key = write(tmp_path / "key", sim.api_key)
    request = RunRequest(
        manifest=manifest, paths=paths_for(manifest), settings=settings, api_url=sim.url, api_key_file=key
    )
    with anyio.fail_after(HANG_S):
        result = await run_campaign(request)
    return result.outcome.exit_code


@contextlib.asynccontextmanager
async def engine_on(
    tmp_path: Path, sim: Simulator, manifest: Manifest, settings: RunSettings
) -> AsyncIterator[tuple[Engine, SqliteStore]]:
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        async with (
            ApiClient(sim.url, sim.api_key, timeouts=settings.timeouts, budget=RequestBudget(1000.0)) as api,
            Downloader(timeouts=settings.timeouts) as downloader,
        ):
            yield Engine(manifest, store, api, downloader, settings, tmp_path / "out"), store
    finally:
        await store.close()


def slow_first_submit(slow_s: float = 1.0) -> FaultPlan:
    """The first POST creates its job, then answers only after `slow_s`."""
    return FaultPlan(script=(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.SLOW, nth=1),), slow_s=slow_s)


def by_id(rows: list[JobRow]) -> dict[str, JobRow]:
    return {r.id: r for r in rows}


# -- --max-new-jobs -------------------------------------------------------------------


async def test_max_new_jobs_2_sends_exactly_2_of_3_and_the_run_ends(tmp_path: Path) -> None:
    manifest = images(tmp_path, 3)
    async with Simulator(fast_sim()) as sim:
        await campaign(tmp_path, sim, manifest, fast_run(max_new_jobs=2))  # returns: it does not wait for more
        assert sorted(sim.ledger.tag_values()) == ["sub/j0", "sub/j1"]  # not 1, not 3
    summary = json.loads((tmp_path / "outputs" / "sub" / "summary.json").read_text())
    assert {j["id"]: j["state"] for j in summary["jobs"]} == {"j0": "done", "j1": "done", "j2": "pending"}


async def test_max_new_jobs_1_sends_one_job(tmp_path: Path) -> None:
    manifest = images(tmp_path, 2)
    async with Simulator(fast_sim()) as sim:
        await campaign(tmp_path, sim, manifest, fast_run(max_new_jobs=1))
        assert sorted(sim.ledger.tag_values()) == ["sub/j0"]


# -- --max-active ---------------------------------------------------------------------


async def test_max_active_2_never_has_more_than_2_jobs_at_the_service(tmp_path: Path) -> None:
    manifest = images(tmp_path, 5)
    async with Simulator(fast_sim(time_scale=2000.0)) as sim:
        code = await campaign(tmp_path, sim, manifest, fast_run(max_active=2))
        made = [sim.service.jobs[e.job_id] for e in sim.ledger.jobs]
    assert code == 0 and len(made) == 5
    for job in made:
        # A slot is free only once the run saw a job end, which is after it ended at the service.
        alive = [o for o in made if o.created < job.created and o.end > job.created]
        assert len(alive) < 2, (job.job_id, [o.job_id for o in alive])


async def test_a_slow_answer_holds_its_own_slot_only(tmp_path: Path) -> None:
    """--max-active 2: while j0's answer is slow, j1 runs and ends, and its slot takes j2 at
    once; j2 is never sent while j0 and j1 are both in flight."""
    manifest = images(tmp_path, 4)
    settings = fast_run(max_active=2, settings={"timeouts": Timeouts(api_read_s=10.0)})
    async with Simulator(fast_sim(time_scale=200.0, faults=slow_first_submit())) as sim:  # an image: ~0.15 s
        async with engine_on(tmp_path, sim, manifest, settings) as (engine, store), anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await until(lambda: len(sim.ledger.jobs) >= 3)
            slow = next(r for r in await store.jobs() if r.remote_id is None and r.state is JobState.SUBMITTING)
            assert sim.ledger.jobs[0].tags[-1]["value"] == f"sub/{slow.id}"  # the slow one is still unanswered
            second, third = sim.service.jobs[sim.ledger.jobs[1].job_id], sim.ledger.jobs[2]
            assert second.end <= third.created_at  # the slot it took was freed by a job that had ended
            tg.cancel_scope.cancel()


async def test_a_post_records_its_grace_window_as_it_leaves(tmp_path: Path) -> None:
    """While an answer is awaited, the job shows when its answer would be looked for
    (`status`: reconcile_after; a restart after a kill waits until then)."""
    manifest = images(tmp_path, 1)
    settings = fast_run(settings={"timeouts": Timeouts(api_read_s=10.0), "reconcile_grace_s": 7.0})
    async with Simulator(fast_sim(faults=slow_first_submit())) as sim:
        async with engine_on(tmp_path, sim, manifest, settings) as (engine, store), anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await until(lambda: len(sim.ledger.jobs) == 1)  # created; its answer is slow
            row = await store.job("j0")
            assert row.state is JobState.SUBMITTING and row.remote_id is None
            assert row.attempt_at is not None and row.intent_at is not None and row.attempt_at >= row.intent_at
            assert row.reconcile_at == pytest.approx(row.attempt_at + 10.0 + 7.0)
            tg.cancel_scope.cancel()


# -- what is recorded -----------------------------------------------------------------


async def test_a_refused_job_keeps_the_apis_422_reason(tmp_path: Path) -> None:
    path = write(
        tmp_path / "sub.yaml",
        "campaign: sub\njobs:\n- {id: bad, type: image_gen, prompt: p, base_model: sd-9000}\n",
    )
    async with Simulator(fast_sim()) as sim:
        code = await campaign(tmp_path, sim, load_manifest(path), fast_run())
        assert sim.ledger.jobs == []
    assert code == 1
    summary = json.loads((tmp_path / "outputs" / "sub" / "summary.json").read_text())
    (job,) = summary["jobs"]
    assert job["state"] == "invalid"
    assert job["reason"].startswith("the API refused it (422): base_model: unknown base_model"), job["reason"]


async def test_a_dry_run_records_the_id_the_api_answered(tmp_path: Path) -> None:
    manifest = images(tmp_path, 1)
    async with Simulator(fast_sim()) as sim:
        async with engine_on(tmp_path, sim, manifest, replace(fast_run(), dry_run=True)) as (engine, store):
            with anyio.fail_after(HANG_S):
                await engine.run()
            row = await store.job("j0")
        assert sim.ledger.jobs == []
    assert row.state is JobState.DRY_RUN_OK
    assert row.reason is not None and row.reason.startswith("accepted by the API as TEST_"), row.reason


async def test_a_jobs_own_tags_are_sent_and_its_campaign_tag_is_ours(tmp_path: Path) -> None:
    tags = ", tags: [{key: team, value: blue}, {key: dreamlook-batch, value: spoofed}]"
    manifest = images(tmp_path, 1, extra=tags)
    async with Simulator(fast_sim()) as sim:
        assert await campaign(tmp_path, sim, manifest, fast_run()) == 0
        (entry,) = sim.ledger.jobs
    assert entry.tags == [{"key": "team", "value": "blue"}, {"key": "dreamlook-batch", "value": "sub/j0"}]


async def test_a_new_job_is_first_looked_at_after_the_poll_wait(tmp_path: Path) -> None:
    """A fixed 0.5 s poll and an image that takes ~0.2 s: one status GET, not one at once
    (still queued) and another later."""
    manifest = images(tmp_path, 1)
    settings = replace(fast_run(), image_poll=PollPolicy.fixed(0.5), batch_status=False)
    async with Simulator(fast_sim(time_scale=200.0)) as sim:
        assert await campaign(tmp_path, sim, manifest, settings) == 0
        assert sim.ledger.requests["get"] == 1, dict(sim.ledger.requests)


# -- dry runs: nothing in flight counts, the concurrency limit does ------------------


async def test_a_dry_run_with_max_active_1_sends_one_post_at_a_time(tmp_path: Path) -> None:
    """A dry run has nothing in flight to count: only the concurrency limit holds it to one
    POST at a time. The answer is slower than the scheduler's idle wake-up, which finds
    room for another job meanwhile (~6 s: no earlier wake-up exists in a dry run)."""
    manifest = images(tmp_path, 2)
    settings = replace(fast_run(max_active=1), dry_run=True, timeouts=Timeouts(api_read_s=30.0))
    async with Simulator(fast_sim(faults=slow_first_submit(IDLE_WAKE_S + 0.7))) as sim:
        async with engine_on(tmp_path, sim, manifest, settings) as (engine, store), anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await until(lambda: sim.ledger.requests["submit"] >= 2)
            # The second POST went out only after the first was answered.
            assert (await store.job("j0")).state is JobState.DRY_RUN_OK
            tg.cancel_scope.cancel()


async def test_a_dry_run_goes_on_past_a_slow_answer(tmp_path: Path) -> None:
    manifest = images(tmp_path, 4)
    settings = replace(fast_run(max_active=2), dry_run=True, timeouts=Timeouts(api_read_s=10.0))
    async with Simulator(fast_sim(faults=slow_first_submit(1.0))) as sim:
        async with engine_on(tmp_path, sim, manifest, settings) as (engine, store), anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await until(lambda: sim.ledger.requests["submit"] >= 3)
            states = {r.id: r.state for r in await store.jobs()}
            # The third POST went out while the slow answer (j0's or j1's) was still awaited.
            assert JobState.PENDING in (states["j0"], states["j1"]), states
            tg.cancel_scope.cancel()
