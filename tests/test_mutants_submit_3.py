"""The submit stage's guards, seen by a user: adoption that fails for one type sends nothing,
--max-new-jobs holds while an answer is slow, a job not yet looked for by tag holds back
no other, a run with a lost answer it cannot look for ends, the recorded body does not
depend on how the manifest was written, an id commit that fails fails for every caller;
and in a shared (PostgreSQL) campaign: the campaign's submit rate and a lease too short for
a POST's timeout each keep POSTs from going out.

Real simulator, real SQLite files and a real PostgreSQL database; the engine driven in-process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from orchestrator import load_manifest
from orchestrator.api.budget import RequestBudget
from orchestrator.api.client import ApiClient
from orchestrator.config import RunSettings, Timeouts
from orchestrator.errors import StoreError
from orchestrator.manifest.load import Manifest, spec_fingerprint
from orchestrator.models import JobState
from orchestrator.run.engine import Engine
from orchestrator.run.submit import IdCommitter
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator
from orchestrator.store import SqliteStore, Store
from orchestrator.store.pg_lease import Worker
from orchestrator.store.postgres import PostgresStore
from orchestrator.transfer.file import Downloader

from .conftest import fast_run, fast_sim, write
from .test_mutants_adopt import MANIFEST
from .test_mutants_submit import HANG_S, engine_on, images, slow_first_submit

pytestmark = pytest.mark.anyio


def lists_fail_from(nth: int) -> FaultPlan:
    """Every job-list read from the `nth` on answers 5xx (retries included)."""
    return FaultPlan(script=(ScriptedFault(route=Route.LIST, kind=FaultKind.SERVER_ERROR, nth=nth, count=10_000),))


async def synced(store: Store, manifest: Manifest) -> None:
    """The manifest in the store, as a run's start puts it there."""
    fingerprints = [spec_fingerprint(s) for s in manifest.jobs]
    await store.sync_manifest(manifest.campaign, manifest.jobs, fingerprints, time.time())


@contextlib.asynccontextmanager
async def engine_with(
    tmp_path: Path, sim: Simulator, manifest: Manifest, settings: RunSettings, store: Store
) -> AsyncIterator[Engine]:
    """`engine_on` over a store of the caller's (here: a PostgreSQL worker's)."""
    async with (
        ApiClient(sim.url, sim.api_key, timeouts=settings.timeouts, budget=RequestBudget(1000.0)) as api,
        Downloader(timeouts=settings.timeouts) as downloader,
    ):
        yield Engine(manifest, store, api, downloader, settings, tmp_path / "out")


# -- adoption ---------------------------------------------------------------------------


async def test_when_one_types_job_list_cannot_be_read_no_job_of_any_type_is_sent(tmp_path: Path) -> None:
    """The dreambooth list is read (its job is looked for), the image_gen list is not: nothing
    new is sent, not even the dreambooth job whose tag was looked for."""
    manifest = load_manifest(write(tmp_path / "camp.yaml", MANIFEST))
    async with Simulator(fast_sim(faults=lists_fail_from(2))) as sim:
        async with engine_on(tmp_path, sim, manifest, fast_run()) as (engine, store):
            with anyio.fail_after(HANG_S):
                outcome = await engine.run(once=True)
            states = {r.id: (r.state, r.adoption_checked) for r in await store.jobs()}
        assert sim.ledger.requests["list"] >= 2 and sim.ledger.requests["submit"] == 0
    assert states == {"d": (JobState.PENDING, True), "i": (JobState.PENDING, False)}, states
    assert any("could not read the job list" in p for p in outcome.problems), outcome.problems


# -- the pass over ready jobs -------------------------------------------------------------


async def test_a_job_not_yet_looked_for_by_tag_does_not_hold_back_the_next_one(tmp_path: Path) -> None:
    """j0's tag was never looked for in the job list, j1's was: j1 goes, j0 waits."""
    manifest = images(tmp_path, 2)
    async with Simulator(fast_sim()) as sim:
        async with engine_on(tmp_path, sim, manifest, fast_run()) as (engine, store):
            await synced(store, manifest)
            await store.adopt([], ["j1"], time.time())  # looked for: not at the service
            with anyio.fail_after(HANG_S):
                async with anyio.create_task_group() as tg:
                    assert await engine.submit.start_due(tg, stopping=False) == 1
            states = {r.id: r.state for r in await store.jobs()}
        assert sim.ledger.tag_values() == {"sub/j1": 1}
    assert states == {"j0": JobState.PENDING, "j1": JobState.QUEUED}, states


async def test_max_new_jobs_holds_when_jobs_become_ready_while_an_answer_is_slow(tmp_path: Path) -> None:
    """--max-new-jobs 2: j0 goes (its answer slow); j1 and j2 become ready (looked for by tag)
    while j0's POST is out: one more goes, not two."""
    manifest = images(tmp_path, 3)
    settings = fast_run(max_new_jobs=2)
    async with Simulator(fast_sim(faults=slow_first_submit(0.4))) as sim:
        async with engine_on(tmp_path, sim, manifest, settings) as (engine, store):
            await synced(store, manifest)
            await store.adopt([], ["j0"], time.time())
            with anyio.fail_after(HANG_S):
                async with anyio.create_task_group() as tg:
                    assert await engine.submit.start_due(tg, stopping=False) == 1
                    assert "j0" in engine.ctx.posting
                    await store.adopt([], ["j1", "j2"], time.time())
                    await engine.submit.start_due(tg, stopping=False)
            states = {r.id: r.state for r in await store.jobs()}
        assert sim.ledger.tag_values() == {"sub/j0": 1, "sub/j1": 1}
    assert states["j2"] is JobState.PENDING, states


async def test_a_run_whose_only_slot_holds_a_lost_answer_it_cannot_look_for_ends(tmp_path: Path) -> None:
    """--max-active 1, and the one job in flight is a lost answer whose job list cannot be read:
    the run has nothing left to do here and ends (the next run looks again)."""
    manifest = images(tmp_path, 1)
    settings = fast_run(max_active=1)
    async with Simulator(fast_sim(faults=lists_fail_from(1))) as sim:
        async with engine_on(tmp_path, sim, manifest, settings) as (engine, store):
            await synced(store, manifest)
            long_ago = time.time() - 3600
            await store.record_intents([("j0", "{}", spec_fingerprint(manifest.by_id["j0"]))], long_ago)
            await store.record_attempt("j0", long_ago, settings.reconcile_after(long_ago))
            with anyio.fail_after(4.0):  # ends at once; a run that waits on would wait forever
                outcome = await engine.run()
            row = await store.job("j0")
        assert sim.ledger.requests["submit"] == 0
    assert row.state is JobState.SUBMITTING and row.remote_id is None
    assert any(p.startswith("j0: could not read the job list") for p in outcome.problems), outcome.problems


async def test_the_recorded_body_is_the_same_however_the_manifest_orders_a_jobs_keys(tmp_path: Path) -> None:
    """What the state keeps of a sent job is canonical JSON (keys sorted): the same job written
    with its keys in another order records the same bytes."""
    orders = {
        "a": "- {id: j0, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5}\n",
        "b": "- {base_model: stable-diffusion-v1-5, prompt: p, type: image_gen, id: j0}\n",
    }
    recorded: dict[str, str | None] = {}
    for name, line in orders.items():
        manifest = load_manifest(write(tmp_path / name / "sub.yaml", "campaign: sub\njobs:\n" + line))
        async with (
            Simulator(fast_sim()) as sim,
            engine_on(tmp_path / name, sim, manifest, fast_run()) as (engine, store),
        ):
            with anyio.fail_after(HANG_S):
                await engine.run(once=True)
            recorded[name] = (await store.job("j0")).sent_payload
    sent = recorded["a"]
    assert sent is not None and sent == recorded["b"]
    assert sent == json.dumps(json.loads(sent), sort_keys=True)


# -- job ids committed together ------------------------------------------------------------


async def test_when_a_shared_id_commit_fails_every_caller_in_it_fails(tmp_path: Path) -> None:
    """Two ids arrive together and share one commit; j1 is not being submitted, so the commit
    fails: neither caller returns as if its id were recorded, and j0's id is not."""
    manifest = images(tmp_path, 2)
    failed: dict[str, BaseException | None] = {}
    async with await SqliteStore.open(tmp_path / "state.db") as store:
        await synced(store, manifest)
        await store.record_intents([("j0", "{}", spec_fingerprint(manifest.by_id["j0"]))], time.time())
        ids = IdCommitter(store, time.time)

        async def commit(job_id: str) -> None:
            try:
                await ids.commit(job_id, f"remote-{job_id}", None)
                failed[job_id] = None
            except StoreError as exc:
                failed[job_id] = exc

        with anyio.fail_after(HANG_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(commit, "j0")
                tg.start_soon(commit, "j1")
        row = await store.job("j0")
    assert isinstance(failed["j0"], StoreError) and isinstance(failed["j1"], StoreError), failed
    assert row.state is JobState.SUBMITTING and row.remote_id is None


# -- a shared campaign (PostgreSQL) --------------------------------------------------------


async def test_a_shared_campaigns_submit_rate_lets_one_job_go_from_a_full_bucket(tmp_path: Path, pg_url: str) -> None:
    """A submit rate of 1/s for the whole campaign: one pass records (and sends) one job; the
    others stay pending for a later pass."""
    manifest = images(tmp_path, 3)
    # A POST's timeout short enough for the default lease to cover it.
    settings = fast_run(submit_rate_per_s=1.0, settings={"timeouts": Timeouts(connect_s=1.0, api_read_s=1.0)})
    async with (
        Simulator(fast_sim()) as sim,
        await PostgresStore.open(pg_url, "sub", worker=Worker("w1", "host", 1)) as store,
    ):
        async with engine_with(tmp_path, sim, manifest, settings, store) as engine:
            with anyio.fail_after(HANG_S):
                await engine.run(once=True)
        states = {r.id: r.state for r in await store.jobs()}
        assert sim.ledger.tag_values() == {"sub/j0": 1}
    assert states == {"j0": JobState.QUEUED, "j1": JobState.PENDING, "j2": JobState.PENDING}, states


async def test_a_worker_whose_lease_cannot_cover_a_posts_timeout_sends_nothing(tmp_path: Path, pg_url: str) -> None:
    """Leases of 1 s, a POST that may take its 70 s timeout and more: the job is never sent by
    this worker (another could take it over mid-POST and send it too)."""
    manifest = images(tmp_path, 1)
    async with (
        Simulator(fast_sim()) as sim,
        await PostgresStore.open(pg_url, "sub", worker=Worker("w1", "host", 1), lease_s=1.0) as store,
    ):
        async with engine_with(tmp_path, sim, manifest, fast_run(), store) as engine:
            with anyio.fail_after(HANG_S):
                await engine.run(once=True)
        row = await store.job("j0")
        assert sim.ledger.requests["submit"] == 0
    assert row.state is JobState.SUBMITTING and row.remote_id is None


@pytest.fixture(params=["sqlite", "postgres-worker"])
def shared_url(request: pytest.FixtureRequest) -> str | None:
    """None: a SQLite state (one process); else a fresh PostgreSQL database (a shared campaign)."""
    return request.getfixturevalue("pg_url") if request.param == "postgres-worker" else None


async def test_a_post_the_request_budget_held_past_its_lease_is_not_sent_then(
    tmp_path: Path, shared_url: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A POST may take connect + answer + a margin (here 0.15 s). In a shared campaign it must
    leave within that of its lease check: one the request budget held longer (0.5 s, two
    requests a second) is not sent then (logged as such, tried again with a fresh check). One
    process alone owns its campaign: there, the POST goes after the wait."""
    manifest = images(tmp_path, 1)
    timeouts = Timeouts(connect_s=0.05, api_read_s=0.05)
    settings = fast_run(settings={"timeouts": timeouts, "post_lease_margin_s": 0.05})
    store: Store
    shared = shared_url is not None
    if shared_url is not None:
        store = await PostgresStore.open(shared_url, "sub", worker=Worker("w1", "host", 1), lease_s=5.0)
    else:
        store = await SqliteStore.open(tmp_path / "state.db")
    budget = RequestBudget(2.0, burst=1.0)  # the adoption's list read takes the only token
    try:
        async with (
            Simulator(fast_sim()) as sim,
            ApiClient(sim.url, sim.api_key, timeouts=timeouts, budget=budget) as api,
            Downloader(timeouts=timeouts) as downloader,
        ):
            engine = Engine(manifest, store, api, downloader, settings, tmp_path / "out")
            with caplog.at_level(logging.INFO, logger="orchestrator"), anyio.fail_after(HANG_S):
                await engine.run(once=True)
            submits = sim.ledger.requests["submit"]
    finally:
        await store.close()
    held_back = [r.getMessage() for r in caplog.records if "waited for the request budget past" in r.getMessage()]
    assert bool(held_back) is shared, held_back
    if not shared:
        assert submits == 1  # sent after the wait
