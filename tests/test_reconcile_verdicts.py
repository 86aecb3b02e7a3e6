"""The verdicts about a lost submission: found where it is listed, absent only where the list
provably reaches back, and never somebody else's job taken for ours.

A wrong FOUND loses a job (ours is never made); a wrong ABSENT pays twice (ours is sent
again). `reconcile()` runs against the real simulator; the two pure rules it relies on
(`reaches_back`, `_config_matches`) are checked directly on the API's own time format.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from orchestrator.api.client import LIST_PAGE, ApiClient
from orchestrator.api.jobs import parse_time
from orchestrator.config import RetryPolicy
from orchestrator.manifest.load import CAMPAIGN_TAG_KEY
from orchestrator.models import JobType
from orchestrator.run.reconcile import (
    CLOCK_SKEW_S,
    MAX_PAGES,
    Lost,
    Verdict,
    _config_matches,
    reaches_back,
    reconcile,
)
from orchestrator.sim import FaultPlan, FaultRates, Simulator
from orchestrator.sim.service import JobKind, iso

from .conftest import fast_sim

QUICK = RetryPolicy(attempts=2, total_s=5.0, backoff_min_s=0.01, backoff_max_s=0.02)
OURS = {"prompt": "a lighthouse at dusk", "base_model": "stable-diffusion-v1-5", "seed": 7}
TAG = "camp/j0"


def lost(intent_at: float) -> Lost:
    body = {**OURS, "tags": [{"key": CAMPAIGN_TAG_KEY, "value": TAG}]}
    return Lost("j0", TAG, json.dumps(body), intent_at)


async def verdict(sim: Simulator, intent_at: float) -> tuple[Verdict, str | None, str]:
    async with ApiClient(sim.url, sim.api_key) as api:
        with anyio.fail_after(30):
            found = await reconcile(api, QUICK, JobType.IMAGE_GEN, [lost(intent_at)], set())
    return found["j0"].verdict, found["j0"].remote_id, found["j0"].why


async def submit(sim: Simulator, body: dict[str, Any]) -> str:
    async with ApiClient(sim.url, sim.api_key) as api:
        return await api.submit(JobType.IMAGE_GEN, body)


@pytest.mark.anyio
async def test_a_lost_job_on_the_second_page_is_found_not_declared_absent() -> None:
    """Newer jobs fill the first page; only jobs older than the attempt prove the list reaches back."""
    async with Simulator(fast_sim(time_scale=1.0)) as sim:
        intent_at = time.time() - 1
        ours = await submit(sim, {**OURS, "tags": [{"key": CAMPAIGN_TAG_KEY, "value": TAG}]})
        for i in range(LIST_PAGE + 5):
            await submit(sim, {"prompt": f"someone else's picture {i}", "base_model": "stable-diffusion-v1-5"})
        found = await verdict(sim, intent_at)
        assert found[:2] == (Verdict.FOUND, ours), found
        assert sim.ledger.requests["list"] == 2  # the second page was read
        assert len(sim.ledger.jobs) == LIST_PAGE + 6  # nothing was sent again


@pytest.mark.anyio
@pytest.mark.parametrize(
    "their_tags",
    [[], [{"key": "team", "value": "renders"}]],
    ids=["untagged", "other-tags"],
)
async def test_a_strangers_job_with_our_config_is_not_taken_for_ours(their_tags: list[dict[str, str]]) -> None:
    """The list shows tags, ours is not there: a job with the same settings is somebody else's."""
    async with Simulator(fast_sim(time_scale=1.0)) as sim:
        intent_at = time.time() - 1
        await submit(sim, {**OURS, "tags": their_tags})
        found = await verdict(sim, intent_at)
    assert found[:2] == (Verdict.ABSENT, None), found


@pytest.mark.anyio
async def test_an_unreadable_job_list_says_why() -> None:
    async with Simulator(fast_sim(time_scale=1.0, faults=FaultPlan(rates=FaultRates(server_error=1.0)))) as sim:
        found = await verdict(sim, time.time() - 1)
    assert found[:2] == (Verdict.UNREAD, None), found
    why = found[2]
    assert why.startswith("could not read the job list to check (") and "list" in why[len("could not read") :], why


SINCE = 1_790_000_000.0  # an intent, in our clock's Unix seconds


def page(*times: float | None, key: str = "state_queued_start") -> list[dict[str, Any]]:
    return [{"job_id": f"r{i}", key: iso(t)} for i, t in enumerate(times)]


def test_a_page_reaches_back_only_with_a_job_from_before_the_intent_and_its_skew() -> None:
    enough = reaches_back(SINCE)
    before = SINCE - CLOCK_SKEW_S - 1
    assert parse_time(iso(before)) == before  # the API's format round-trips exactly
    assert enough(page(SINCE + 60, before))
    assert enough(page(before, key="created_at"))  # when the queue time is missing
    # The queue time wins over created_at when both are given.
    assert enough([{"state_queued_start": iso(before), "created_at": iso(SINCE + 60)}])
    assert not enough([{"state_queued_start": iso(SINCE + 60), "created_at": iso(before)}])
    # Just after the limit, at it, or after the intent: the job could be on the next page.
    assert not enough(page(SINCE - CLOCK_SKEW_S))
    assert not enough(page(SINCE - CLOCK_SKEW_S + 1))
    assert not enough(page(SINCE + 1, SINCE + 120))
    assert not enough(page(SINCE + 1, key="created_at"))
    # Items without times never prove anything.
    assert not enough([{"job_id": "r0"}, {"job_id": "r1", "state_queued_start": None, "created_at": "garbage"}])
    assert not enough([])


def test_an_item_whose_config_is_not_a_mapping_never_matches() -> None:
    sent = {**OURS, "tags": [{"key": CAMPAIGN_TAG_KEY, "value": TAG}], "dry_run": False}
    assert _config_matches(sent, dict(OURS))  # what was sent, without the keys never sent on
    assert not _config_matches(sent, {**OURS, "seed": 8})
    for config in (None, [], "a lighthouse at dusk", 7, [("prompt", OURS["prompt"])]):
        assert not _config_matches(sent, config), config


def tagged(value: str) -> dict[str, Any]:
    return {**OURS, "tags": [{"key": CAMPAIGN_TAG_KEY, "value": value}]}


def lost_job(job_id: str) -> Lost:
    return Lost(job_id, f"camp/{job_id}", json.dumps(tagged(f"camp/{job_id}")), time.time() - 1)


async def verdicts(sim: Simulator, jobs: list[Lost], claimed: frozenset[str] = frozenset()) -> dict[str, Any]:
    async with ApiClient(sim.url, sim.api_key) as api:
        with anyio.fail_after(60):
            found = await reconcile(api, QUICK, JobType.IMAGE_GEN, jobs, claimed)
    return {job_id: (r.verdict, r.remote_id, r.why) for job_id, r in found.items()}


@pytest.mark.anyio
@pytest.mark.parametrize("tags_listed", [True, False], ids=["list-has-tags", "list-without-tags"])
async def test_a_list_that_does_not_reach_back_proves_nothing(tags_listed: bool) -> None:
    """More jobs made since the attempt than the pages read: absent from them is not absent."""
    async with Simulator(fast_sim(time_scale=1.0, list_echoes_tags=tags_listed)) as sim:
        intent_at = sim.now() - 1
        newer = MAX_PAGES * LIST_PAGE + 1
        for i in range(newer):  # somebody else's jobs, made through the service itself (no HTTP: quicker)
            sim.service.submit(
                JobKind.IMAGE_GEN, {"prompt": f"theirs {i}", "base_model": "stable-diffusion-v1-5"}, sim.now()
            )
        found = await verdicts(sim, [Lost("j0", TAG, json.dumps(tagged(TAG)), intent_at)])
    verdict, remote, why = found["j0"]
    assert (verdict, remote) == (Verdict.UNKNOWN, None)
    assert f"{MAX_PAGES * LIST_PAGE} jobs" in why, why  # what was read, for the person who settles it


@pytest.mark.anyio
async def test_every_lost_job_gets_its_own_verdict() -> None:
    async with Simulator(fast_sim(time_scale=1.0)) as sim:
        ours = await submit(sim, tagged("camp/j0"))
        found = await verdicts(sim, [lost_job("j0"), lost_job("j1"), lost_job("j2")])
    assert {k: v[:2] for k, v in found.items()} == {
        "j0": (Verdict.FOUND, ours),
        "j1": (Verdict.ABSENT, None),
        "j2": (Verdict.ABSENT, None),
    }


@pytest.mark.anyio
async def test_a_listed_job_is_claimed_by_one_lost_job_at_most() -> None:
    """Without tags in the list, two lost jobs of the same config cannot both be the one listed job."""
    async with Simulator(fast_sim(time_scale=1.0, list_echoes_tags=False)) as sim:
        listed = await submit(sim, tagged("camp/j0"))
        found = await verdicts(sim, [lost_job("j0"), lost_job("j1")])
    assert {k: v[:2] for k, v in found.items()} == {"j0": (Verdict.FOUND, listed), "j1": (Verdict.ABSENT, None)}


@pytest.mark.anyio
async def test_a_job_the_campaign_already_holds_is_not_matched_again() -> None:
    async with Simulator(fast_sim(time_scale=1.0, list_echoes_tags=False)) as sim:
        held = await submit(sim, tagged("camp/j0"))  # j0's, known to the campaign by its id
        found = await verdicts(sim, [lost_job("j1")], claimed=frozenset({held}))
    assert found["j1"][:2] == (Verdict.ABSENT, None)


@pytest.mark.anyio
async def test_several_matching_jobs_make_unknown_and_name_the_newest_five() -> None:
    async with Simulator(fast_sim(time_scale=1.0, list_echoes_tags=False)) as sim:
        made = [await submit(sim, dict(OURS)) for _ in range(6)]
        found = await verdicts(sim, [lost_job("j0")])
    newest = ", ".join(reversed(made[1:]))
    why = f"several listed jobs match its config ({newest}); which one is ours is unclear"
    assert found == {"j0": (Verdict.UNKNOWN, None, why)}
