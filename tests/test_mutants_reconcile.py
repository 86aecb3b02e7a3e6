"""A lost submission's verdict from the job list (run/reconcile.py), what the resolve stage
records from it (run/resolve.py), and the name a range retry is logged under (api/retry.py).

Against the real simulator and a real state file; the resolve stage is driven directly, with
the run's context built as the engine builds it, on a clock the test sets."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.api.client import ApiClient
from orchestrator.api.retry import range_attempts
from orchestrator.config import RetryPolicy, RunSettings
from orchestrator.errors import DownloadError
from orchestrator.manifest.load import CAMPAIGN_TAG_KEY, load_manifest, spec_fingerprint
from orchestrator.models import JobState, JobType
from orchestrator.run.context import JobObjects, RunContext
from orchestrator.run.reconcile import Lost, Reconciled, Verdict, _by_config, reconcile
from orchestrator.run.resolve import ResolveStage
from orchestrator.sim import Simulator
from orchestrator.store import SqliteStore
from orchestrator.ui import clock

from .conftest import fast_sim, write
from .test_mutants_retry_store import fails_once

QUICK = RetryPolicy(attempts=2, total_s=5.0, backoff_min_s=0.01, backoff_max_s=0.02)
OURS = {"prompt": "a lighthouse at dusk", "base_model": "stable-diffusion-v1-5", "seed": 7}
OUR_TAG = {"key": CAMPAIGN_TAG_KEY, "value": "camp/j0"}


def sent(tag_value: str = "camp/j0") -> str:
    return json.dumps({**OURS, "tags": [{"key": CAMPAIGN_TAG_KEY, "value": tag_value}]}, sort_keys=True)


async def submit(sim: Simulator, body: dict[str, Any]) -> str:
    async with ApiClient(sim.url, sim.api_key) as api:
        return await api.submit(JobType.IMAGE_GEN, body)


async def verdict_of(sim: Simulator, intent_at: float) -> Reconciled:
    async with ApiClient(sim.url, sim.api_key) as api:
        with anyio.fail_after(30):
            found = await reconcile(api, QUICK, JobType.IMAGE_GEN, [Lost("j0", "camp/j0", sent(), intent_at)], set())
    return found["j0"]


# -- reconcile: the verdicts and what they say ----------------------------------------------


@pytest.mark.anyio
async def test_a_job_with_another_tag_before_ours_is_found_by_our_tag_and_says_so() -> None:
    async with Simulator(fast_sim(time_scale=1.0)) as sim:
        intent_at = time.time() - 1
        ours = await submit(sim, {**OURS, "tags": [{"key": "team", "value": "renders"}, OUR_TAG]})
        found = await verdict_of(sim, intent_at)
        assert len(sim.ledger.jobs) == 1
    assert found == Reconciled(Verdict.FOUND, ours, "found by its tag in the job list")


@pytest.mark.anyio
async def test_a_job_found_by_its_config_says_so() -> None:
    async with Simulator(fast_sim(time_scale=1.0, list_echoes_tags=False)) as sim:
        intent_at = time.time() - 1
        ours = await submit(sim, {**OURS, "tags": [OUR_TAG]})
        found = await verdict_of(sim, intent_at)
    assert found == Reconciled(Verdict.FOUND, ours, "found by its config (the list shows no tags)")


def test_a_listed_job_without_an_id_never_lends_a_made_up_id() -> None:
    """An item of the list with no `job_id` cannot be followed: no invented id ("None") is recorded."""
    found = _by_config(Lost("j0", "camp/j0", sent(), 1.0), [{"config": dict(OURS)}], set(), True)
    assert not found.remote_id, found


def test_a_listed_job_without_an_id_is_claimed_by_one_lost_job_at_most() -> None:
    listed: list[dict[str, Any]] = [{"config": dict(OURS)}]
    taken: set[str] = set()
    first = _by_config(Lost("j0", "camp/j0", sent(), 1.0), listed, taken, True)
    second = _by_config(Lost("j1", "camp/j1", sent("camp/j1"), 1.0), listed, taken, True)
    assert first.verdict is Verdict.FOUND
    assert (second.verdict, second.remote_id) == (Verdict.ABSENT, None), second


# -- the resolve stage --------------------------------------------------------------------

MANIFEST = "campaign: camp\njobs:\n- {id: j0, type: image_gen, base_model: stable-diffusion-v1-5, prompt: p0}\n"


@asynccontextmanager
async def resolve_stage(
    tmp_path: Path, sim: Simulator, now: Callable[[], float], settings: RunSettings, manifest_text: str = MANIFEST
) -> AsyncIterator[ResolveStage]:
    """The resolve stage as the engine builds it, over a fresh store of `manifest_text`, on a clock the test sets."""
    manifest = load_manifest(write(tmp_path / "camp.yaml", manifest_text))
    store = await SqliteStore.open(tmp_path / "camp.db")
    try:
        await store.sync_manifest("camp", manifest.jobs, [spec_fingerprint(s) for s in manifest.jobs], now())
        async with ApiClient(sim.url, sim.api_key) as api:
            ctx = RunContext(
                manifest=manifest,
                store=store,
                api=api,
                settings=settings,
                now=now,
                jobs=JobObjects(store, api, settings),
            )
            yield ResolveStage(ctx)
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_lost_answer_waits_a_grace_from_when_it_was_given_up_and_says_until_when(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The POST left long ago but its answer was given up only now: the window counts from now."""
    now = time.time()
    settings = RunSettings()
    async with Simulator(fast_sim()) as sim, resolve_stage(tmp_path, sim, lambda: now, settings) as stage:
        store = stage.store
        await store.record_intents([("j0", sent(), "fp")], now - 3600)
        await store.record_attempt("j0", now - 3600, settings.reconcile_after(now - 3600))
        with caplog.at_level(logging.WARNING, logger="orchestrator"):
            await stage.answer_lost("j0", TimeoutError("no answer"))
        row = await store.job("j0")
        assert row.reconcile_at == now + settings.grace_s
        assert stage.window_end(row) == now + settings.grace_s
    assert (
        f'job.submit_unclear job_id=j0 state=submitting reason="no answer" check_after={clock(now + settings.grace_s)}'
        in caplog.text
    )


@pytest.mark.anyio
async def test_a_job_whose_post_never_left_is_looked_for_from_its_intent(tmp_path: Path) -> None:
    now = time.time()
    async with Simulator(fast_sim()) as sim, resolve_stage(tmp_path, sim, lambda: now, RunSettings()) as stage:
        await stage.store.record_intents([("j0", sent(), "fp")], now - 5)  # killed before the POST
        row = await stage.store.job("j0")
        assert row.attempt_at is None
        assert stage.window_end(row) == now - 5
        assert await stage.next_due() == now - 5


@pytest.mark.anyio
async def test_a_lost_job_found_twice_by_its_tag_is_followed_and_the_copy_recorded(tmp_path: Path) -> None:
    now = time.time()
    settings = RunSettings()
    async with (
        Simulator(fast_sim(time_scale=1.0)) as sim,
        resolve_stage(tmp_path, sim, lambda: now, settings) as stage,
    ):
        store = stage.store
        await store.record_intents([("j0", sent(), "fp")], now - 1)
        await store.record_attempt("j0", now - 1, settings.reconcile_after(now - 1))
        ours = await submit(sim, {**OURS, "tags": [OUR_TAG]})
        copy = await submit(sim, {**OURS, "tags": [OUR_TAG]})
        with anyio.fail_after(30):
            await stage.resolve([await store.job("j0")])
        row = await store.job("j0")
        assert (row.state, row.remote_id) == (JobState.QUEUED, ours)
        # Looked at on the schedule of any job just submitted, not at once.
        assert row.next_check_at is not None and row.next_check_at >= now + settings.image_poll.min_s
        assert await store.duplicates() == {"j0": (copy,)}
        assert len(sim.ledger.jobs) == 2


@pytest.mark.anyio
async def test_a_lost_job_left_unknown_keeps_why_for_the_person_who_settles_it(tmp_path: Path) -> None:
    now = time.time()
    settings = RunSettings()
    async with (
        Simulator(fast_sim(time_scale=1.0, list_echoes_tags=False)) as sim,
        resolve_stage(tmp_path, sim, lambda: now, settings) as stage,
    ):
        store = stage.store
        await store.record_intents([("j0", sent(), "fp")], now - 1)
        await store.record_attempt("j0", now - 1, settings.reconcile_after(now - 1))
        made = [await submit(sim, dict(OURS)) for _ in range(2)]
        with anyio.fail_after(30):
            await stage.resolve([await store.job("j0")])
        row = await store.job("j0")
    why = f"several listed jobs match its config ({made[1]}, {made[0]}); which one is ours is unclear"
    assert (row.state, row.reason) == (JobState.UNKNOWN, why)
    assert len(stage.ctx.events.problems) == 1 and why in stage.ctx.events.problems[0]


# -- retry: a range retry is logged under its own stable event name ---------------------------


@pytest.mark.anyio
async def test_a_retried_range_is_logged_as_a_range_retry(caplog: pytest.LogCaptureFixture) -> None:
    fetch = fails_once(DownloadError("connection reset"), b"bytes")
    policy = RetryPolicy(attempts=3, total_s=5.0, backoff_min_s=0.001, backoff_max_s=0.001)
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert await range_attempts(fetch, policy, "j0/a.png bytes 0-99") == b"bytes"
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 1 and retries[0].startswith('download.range_retry what="j0/a.png bytes 0-99" attempt=1 ')
