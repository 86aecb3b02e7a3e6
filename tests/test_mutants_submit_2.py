"""The submit stage's pass over ready jobs, seen by a user: --max-new-jobs counts each job
sent, --max-active is kept while an answer is slow, and a dependent skipped for a parent
without a checkpoint does not hold back the jobs after it.

Real simulator, real SQLite files, the engine driven in-process (or through `run_campaign`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import anyio
import pytest

from orchestrator import load_manifest
from orchestrator.config import Timeouts
from orchestrator.models import JobState
from orchestrator.sim import Simulator

from .conftest import fast_run, fast_sim, until, write
from .test_mutants_submit import HANG_S, campaign, engine_on, images, slow_first_submit

pytestmark = pytest.mark.anyio


async def test_max_new_jobs_2_with_max_active_1_sends_one_after_the_other_and_stops_at_2(tmp_path: Path) -> None:
    """One job per pass (--max-active 1): the count of jobs sent grows by one each time."""
    manifest = images(tmp_path, 3)
    async with Simulator(fast_sim()) as sim:
        await campaign(tmp_path, sim, manifest, fast_run(max_new_jobs=2, max_active=1))
        assert sorted(sim.ledger.tag_values()) == ["sub/j0", "sub/j1"]
    summary = json.loads((tmp_path / "outputs" / "sub" / "summary.json").read_text())
    assert {j["id"]: j["state"] for j in summary["jobs"]} == {"j0": "done", "j1": "done", "j2": "pending"}


async def test_while_an_answer_is_slow_the_free_slot_takes_one_job_not_two(tmp_path: Path) -> None:
    """--max-active 2 and j0's answer slow: j0 holds one slot, so the jobs after it go one at
    a time, each created at the service only after the one before it had ended there."""
    manifest = images(tmp_path, 4)
    settings = fast_run(max_active=2, settings={"timeouts": Timeouts(api_read_s=10.0)})
    async with Simulator(fast_sim(time_scale=200.0, faults=slow_first_submit(1.5))) as sim:  # an image: ~0.15 s
        async with engine_on(tmp_path, sim, manifest, settings) as (engine, store), anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await until(lambda: len(sim.ledger.jobs) >= 4)
            slow = await store.job(sim.ledger.jobs[0].tags[-1]["value"].removeprefix("sub/"))
            assert slow.state is JobState.SUBMITTING and slow.remote_id is None  # still holds its slot
            made = [sim.service.jobs[e.job_id] for e in sim.ledger.jobs]
            for before, after in itertools.pairwise(made[1:]):
                assert before.end <= after.created, (before.job_id, after.job_id)
            tg.cancel_scope.cancel()


async def test_a_skipped_dependent_does_not_hold_back_the_next_job_in_a_single_pass(tmp_path: Path) -> None:
    """`--once` (one submit pass): the parent was refused, so its dependent is skipped, and
    the plain job after it in the manifest is still sent in that same pass."""
    path = write(
        tmp_path / "sub.yaml",
        "campaign: sub\njobs:\n"
        "- {id: p, type: dreambooth, base_model: sd-9000, instance_prompt: x, image_urls: [u]}\n"
        "- {id: d, type: image_gen, prompt: q, checkpoint_from: p}\n"
        "- {id: x, type: image_gen, prompt: r, base_model: stable-diffusion-v1-5}\n",
    )
    manifest = load_manifest(path)
    async with Simulator(fast_sim()) as sim:
        async with engine_on(tmp_path, sim, manifest, fast_run(max_active=1)) as (engine, store):
            with anyio.fail_after(HANG_S):
                await engine.run(once=True)  # room for one: only p goes, and is refused
            assert (await store.job("p")).state is JobState.INVALID
        async with engine_on(tmp_path, sim, manifest, fast_run(max_active=2)) as (engine, store):
            with anyio.fail_after(HANG_S):
                await engine.run(once=True)
            states = {r.id: r.state for r in await store.jobs()}
        assert sorted(sim.ledger.tag_values()) == ["sub/x"]
    assert states["d"] is JobState.SKIPPED and states["x"] is not JobState.PENDING, states
