"""The API client against the simulator: redirects, error mapping, tolerant reading."""

from __future__ import annotations

import pytest
from aiohttp import web

from orchestrator.api.client import ApiClient
from orchestrator.errors import ApiError, AuthError, InvalidJob, NotFound, NotSent, QuotaError, RateLimited, ServerError
from orchestrator.models import JobType
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator

from .conftest import fast_sim
from .simhttp import DB_BODY

pytestmark = pytest.mark.anyio


async def test_307_is_followed_with_method_and_body() -> None:
    async with Simulator(fast_sim()) as sim, ApiClient(sim.url + "/v1", sim.api_key) as api:
        job_id = await api.submit(JobType.DREAMBOOTH, DB_BODY)
        assert [e.job_id for e in sim.ledger.jobs] == [job_id]
        assert sim.ledger.jobs[0].config["instance_prompt"] == DB_BODY["instance_prompt"]
        assert (await api.get_job(JobType.DREAMBOOTH, job_id))["job_id"] == job_id
        assert api.requests == 4  # each call: a 307, then the canonical path


async def test_a_redirect_to_another_host_is_refused_so_the_key_stays_home() -> None:
    async def elsewhere(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("http://127.0.0.2:9/dreambooth")

    app = web.Application()
    app.router.add_post("/dreambooth", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with ApiClient(f"http://127.0.0.1:{runner.addresses[0][1]}", "dl-" + "1" * 32) as api:
            with pytest.raises(ApiError, match="redirect to another host"):
                await api.submit(JobType.DREAMBOOTH, DB_BODY)
    finally:
        await runner.cleanup()


async def test_statuses_map_to_the_error_tree() -> None:
    plan = FaultPlan(
        script=(
            ScriptedFault(route=Route.GET, kind=FaultKind.SERVER_ERROR, nth=1),
            ScriptedFault(route=Route.GET, kind=FaultKind.RATE_LIMITED, nth=2),
        )
    )
    async with Simulator(fast_sim(tokens=0)) as sim:
        async with ApiClient(sim.url, "dl-" + "0" * 32) as wrong:
            with pytest.raises(AuthError):
                await wrong.list_jobs(JobType.DREAMBOOTH)
        async with ApiClient(sim.url, sim.api_key) as api:
            with pytest.raises(QuotaError, match="Not enough tokens"):
                await api.submit(JobType.DREAMBOOTH, DB_BODY)
            with pytest.raises(InvalidJob, match="instance_prompt: field required"):
                await api.submit(JobType.DREAMBOOTH, {"image_urls": ["u"], "base_model": "stable-diffusion-v1-5"})
            with pytest.raises(NotFound):
                await api.get_job(JobType.DREAMBOOTH, "db_00000000")
            sim.set_faults(plan)
            with pytest.raises(ServerError):
                await api.get_job(JobType.DREAMBOOTH, "db_00000000")
            with pytest.raises(RateLimited) as limited:
                await api.get_job(JobType.DREAMBOOTH, "db_00000000")
            assert limited.value.retry_after_s == 1.0


async def test_nothing_listening_is_not_sent() -> None:
    async with ApiClient("http://127.0.0.1:9", "dl-" + "0" * 32) as api:
        with pytest.raises(NotSent):
            await api.submit(JobType.DREAMBOOTH, DB_BODY)


async def test_list_accepts_a_bare_list_or_an_envelope() -> None:
    for envelope in (None, "jobs"):
        async with Simulator(fast_sim(list_envelope=envelope)) as sim, ApiClient(sim.url, sim.api_key) as api:
            job_id = await api.submit(JobType.IMAGE_GEN, {"prompt": "p", "base_model": "stable-diffusion-v1-5"})
            assert [j["job_id"] for j in await api.list_jobs(JobType.IMAGE_GEN, limit=5)] == [job_id]
