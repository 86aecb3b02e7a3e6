"""How the job list is paged for a lost submission (run/reconcile.py `read_list`), and what the
resolve stage (run/resolve.py) says and scans at the end of a run.

The paging rules are checked against the real simulator and, for list behaviours the
simulator does not have (a service whose default page is smaller than ours, one that ignores
`offset`, an item without a `job_id`), against a small real HTTP service that serves a fixed
job list the way the API documents it (`GET /jobs/{type}`, newest first, `limit`/`offset`)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from orchestrator.api.client import LIST_PAGE, ApiClient
from orchestrator.config import RunSettings
from orchestrator.manifest.load import CAMPAIGN_TAG_KEY
from orchestrator.models import JobState, JobType
from orchestrator.run.reconcile import CLOCK_SKEW_S, Lost, Reconciled, Verdict, reconcile
from orchestrator.run.resolve import ResolveStage
from orchestrator.sim import FaultKind, FaultPlan, FaultRates, Route, ScriptedFault, Simulator
from orchestrator.sim.service import JobKind, iso
from orchestrator.ui import clock

from .conftest import fast_sim
from .test_mutants_reconcile import OUR_TAG, OURS, QUICK, resolve_stage, sent, submit, verdict_of

KEY = "dl-" + "1" * 32
THEIR_TAG = {"key": CAMPAIGN_TAG_KEY, "value": "other-campaign/x"}


def listed_job(job_id: str | None, created: float, tags: list[dict[str, str]]) -> dict[str, Any]:
    item: dict[str, Any] = {
        "state_queued_start": iso(created),
        "config": {"prompt": f"somebody else's picture {job_id}"},
        "tags": tags,
    }
    if job_id is not None:
        item["job_id"] = job_id
    return item


@asynccontextmanager
async def job_list_service(
    items: list[dict[str, Any]], *, default_limit: int = LIST_PAGE, ignores_offset: bool = False
) -> AsyncIterator[tuple[ApiClient, list[dict[str, str]]]]:
    """A real HTTP service answering `GET /jobs/image_gen` from `items` (newest first); the
    queries it was asked are kept in the second element."""
    queries: list[dict[str, str]] = []

    async def list_jobs(request: web.Request) -> web.Response:
        queries.append(dict(request.query))
        limit = int(request.query.get("limit", default_limit))
        offset = 0 if ignores_offset else int(request.query.get("offset", 0))
        return web.json_response(items[offset : offset + limit])

    app = web.Application()
    app.router.add_get("/jobs/image_gen", list_jobs)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with ApiClient(f"http://127.0.0.1:{runner.addresses[0][1]}", KEY) as api:
            yield api, queries
    finally:
        await runner.cleanup()


async def reconciled(api: ApiClient, intent_at: float) -> Reconciled:
    with anyio.fail_after(30):
        found = await reconcile(api, QUICK, JobType.IMAGE_GEN, [Lost("j0", "camp/j0", sent(), intent_at)], set())
    return found["j0"]


# -- read_list: pages, and when a listing proves anything ------------------------------------


@pytest.mark.anyio
async def test_a_job_beyond_a_services_smaller_default_page_is_found_because_we_ask_for_full_pages() -> None:
    """We ask for `limit=50`: a service whose default page is 20 still answers 50, so the 20
    newest jobs are not taken for the whole list (and our job, the 31st, for never made)."""
    intent_at = time.time()
    items = [listed_job(f"r{i}", intent_at + 100 - i, [THEIR_TAG]) for i in range(30)]
    items.append({**listed_job("r30", intent_at + 50, [OUR_TAG]), "config": dict(OURS)})
    items += [listed_job(f"r{i}", intent_at - CLOCK_SKEW_S - 1000 - i, [THEIR_TAG]) for i in range(31, 60)]
    async with job_list_service(items, default_limit=20) as (api, queries):
        found = await reconciled(api, intent_at)
    assert found == Reconciled(Verdict.FOUND, "r30", "found by its tag in the job list")
    assert queries == [{"limit": str(LIST_PAGE), "offset": "0"}]


@pytest.mark.anyio
async def test_a_service_that_ignores_offset_is_read_twice_and_proves_nothing() -> None:
    """The second page repeats the first: older jobs cannot be reached, so absent from the 50
    newest is not absent (never sent again), and the reading stops at once."""
    intent_at = time.time()
    items = [listed_job(f"r{i}", intent_at + 100 - i, [THEIR_TAG]) for i in range(LIST_PAGE)]
    async with job_list_service(items, ignores_offset=True) as (api, queries):
        found = await reconciled(api, intent_at)
    why = f"not among the newest {LIST_PAGE} jobs, and the list does not reach back to the attempt"
    assert found == Reconciled(Verdict.UNKNOWN, None, why)
    assert len(queries) == 2


@pytest.mark.anyio
async def test_a_repeated_page_with_a_job_without_an_id_is_still_seen_as_repeated() -> None:
    """An item without `job_id` on the first page is the same item when the page comes again."""
    intent_at = time.time()
    items = [listed_job(f"r{i}", intent_at + 100 - i, [THEIR_TAG]) for i in range(LIST_PAGE)]
    items[10] = listed_job(None, intent_at + 90, [])
    async with job_list_service(items, ignores_offset=True) as (api, queries):
        found = await reconciled(api, intent_at)
    why = f"not among the newest {LIST_PAGE} jobs, and the list does not reach back to the attempt"
    assert found == Reconciled(Verdict.UNKNOWN, None, why)
    assert len(queries) == 2


@pytest.mark.anyio
async def test_a_tagged_listed_job_without_an_id_never_lends_a_made_up_id() -> None:
    """Our tag on an item without `job_id`: no invented remote id is handed on to be followed."""
    intent_at = time.time()
    async with job_list_service([listed_job(None, intent_at + 10, [OUR_TAG])]) as (api, _):
        found = await reconciled(api, intent_at)
    assert found.verdict is Verdict.FOUND
    assert not found.remote_id, found


@pytest.mark.anyio
async def test_a_job_absent_from_a_list_that_reaches_back_before_the_attempt_may_be_sent_again() -> None:
    """The list shows a job made long before the attempt, and not ours: ours was never made."""
    async with Simulator(fast_sim(time_scale=1.0)) as sim:
        intent_at = time.time() - 1
        old = {"prompt": "an older picture", "base_model": "stable-diffusion-v1-5"}
        sim.service.submit(JobKind.IMAGE_GEN, old, intent_at - CLOCK_SKEW_S - 60)
        found = await verdict_of(sim, intent_at)
        assert sim.ledger.requests["list"] == 1
    assert found == Reconciled(Verdict.ABSENT, None, "absent from the job list (1 jobs, back to before the attempt)")


# -- the resolve stage: the duplicate scan and the end-of-run notes ----------------------------

TWO_JOBS = (
    "campaign: camp\njobs:\n"
    "- {id: j0, type: image_gen, base_model: stable-diffusion-v1-5, prompt: p0}\n"
    "- {id: j1, type: image_gen, base_model: stable-diffusion-v1-5, prompt: p1}\n"
)


def stage_for(
    tmp_path: Path, sim: Simulator, now: Callable[[], float], settings: RunSettings
) -> AbstractAsyncContextManager[ResolveStage]:
    return resolve_stage(tmp_path, sim, now, settings, TWO_JOBS)


def first_lists_fail(times: int) -> FaultPlan:
    return FaultPlan(script=(ScriptedFault(route=Route.LIST, kind=FaultKind.SERVER_ERROR, nth=1, count=times),))


@pytest.mark.anyio
async def test_a_duplicate_scan_goes_on_to_the_next_type_when_one_list_cannot_be_read(tmp_path: Path) -> None:
    now = time.time()
    settings = RunSettings(retry=QUICK)
    async with (
        Simulator(fast_sim(time_scale=1.0, faults=first_lists_fail(QUICK.attempts))) as sim,
        stage_for(tmp_path, sim, lambda: now, settings) as stage,
    ):
        await stage.store.record_intents([("j0", sent(), "fp")], now - 1)
        ours = await submit(sim, {**OURS, "tags": [OUR_TAG]})
        copy = await submit(sim, {**OURS, "tags": [OUR_TAG]})
        # Jobs of two types were sent again after a lost answer; the dreambooth list cannot be read.
        stage.resent_since.update({JobType.DREAMBOOTH.value: now - 1, JobType.IMAGE_GEN.value: now - 1})
        with anyio.fail_after(30):
            await stage.scan_for_duplicates()
        assert sim.ledger.requests["list"] == QUICK.attempts + 1
        assert await stage.store.duplicates() == {"j0": (copy,)}
        assert ours != copy


@pytest.mark.anyio
async def test_a_retried_list_read_of_the_duplicate_scan_is_logged_as_the_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    settings = RunSettings(retry=QUICK)
    async with (
        Simulator(fast_sim(time_scale=1.0, faults=first_lists_fail(1))) as sim,
        stage_for(tmp_path, sim, lambda: now, settings) as stage,
    ):
        stage.resent_since[JobType.IMAGE_GEN.value] = now - 1
        with caplog.at_level(logging.INFO, logger="orchestrator"), anyio.fail_after(30):
            await stage.scan_for_duplicates()
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("api.retry ")]
    assert len(retries) == 1 and retries[0].startswith("api.retry what=scan attempt=1 "), retries


@pytest.mark.anyio
async def test_the_end_of_run_notes_say_until_when_each_lost_answer_waits_after_an_unreadable_one(
    tmp_path: Path,
) -> None:
    """j0's job list could not be read (already told); j1 still waits out its window: both are told."""
    now = time.time()
    settings = RunSettings(retry=QUICK)
    async with (
        Simulator(fast_sim(time_scale=1.0, faults=FaultPlan(rates=FaultRates(server_error=1.0)))) as sim,
        stage_for(tmp_path, sim, lambda: now, settings) as stage,
    ):
        store = stage.store
        await store.record_intents([("j0", sent(), "fp"), ("j1", sent("camp/j1"), "fp")], now - 60)
        await store.record_attempt("j0", now - 60, now - 1)
        await store.record_attempt("j1", now - 1, settings.reconcile_after(now - 1))
        with anyio.fail_after(30):
            await stage.resolve([await store.job("j0")])
        await stage.report()
        j1_until = clock(stage.window_end(await store.job("j1")))
        assert (await store.job("j0")).state is JobState.SUBMITTING
    notes = stage.ctx.events.problems
    assert len(notes) == 2, notes
    assert notes[0].startswith("j0: could not read the job list to check ("), notes
    assert notes[1] == (
        f"j1: its answer was lost; it stays submitting until {j1_until}, when the next run looks "
        "for it in the job list (the service may still be creating it)"
    )
