"""Switchable, reproducible faults of the simulator, each seen through real HTTP."""

from __future__ import annotations

from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from anyio.streams.memory import MemoryObjectReceiveStream

from orchestrator.sim import FaultKind, FaultPlan, FaultRates, Route, ScriptedFault, Simulator

from .conftest import fast_sim
from .simhttp import DB_BODY, IG_BODY, Http
from .test_sim_api import wait_state

pytestmark = pytest.mark.anyio


def script(*faults: ScriptedFault, **plan: object) -> FaultPlan:
    return FaultPlan(script=faults, **plan)  # type: ignore[arg-type]


async def test_scripted_5xx_and_429_with_and_without_retry_after() -> None:
    plan = script(
        ScriptedFault(route=Route.GET, kind=FaultKind.SERVER_ERROR, nth=1),
        ScriptedFault(route=Route.GET, kind=FaultKind.RATE_LIMITED, nth=2),
        ScriptedFault(route=Route.GET, kind=FaultKind.RATE_LIMITED_BARE, nth=3),
    )
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        job_id = await http.submit("image_gen", IG_BODY)
        sim.set_faults(plan)
        answers = [await http.call("GET", f"/jobs/image_gen/{job_id}") for _ in range(4)]
        assert answers[0][0] >= 500
        assert answers[1][0] == 429 and answers[1][2]["Retry-After"] == "1"
        assert answers[2][0] == 429 and "Retry-After" not in answers[2][2]
        assert answers[3][0] == 200


async def test_requests_per_second_limit_per_key() -> None:
    async with Simulator(fast_sim(faults=FaultPlan(requests_per_s=5))) as sim, Http(sim) as http:
        statuses = [(await http.call("GET", "/jobs/dreambooth"))[0] for _ in range(12)]
        assert statuses[:5] == [200] * 5 and 429 in statuses
        limited = await http.call("GET", "/jobs/dreambooth")
        assert limited[0] == 429 and int(limited[2]["Retry-After"]) >= 1


async def test_slow_answers_outlast_a_client_timeout() -> None:
    plan = script(ScriptedFault(route=Route.ANY_API, kind=FaultKind.SLOW), slow_s=2.0)
    async with Simulator(fast_sim(faults=plan)) as sim:
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(headers={"authorization": f"Bearer {sim.api_key}"}, timeout=timeout) as s:
            with pytest.raises(TimeoutError):
                async with s.get(f"{sim.url}/jobs/dreambooth"):
                    pass


async def test_ghost_submission_creates_the_job_and_drops_the_connection() -> None:
    plan = script(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST))
    async with Simulator(fast_sim(faults=plan)) as sim, Http(sim) as http:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await http.call(
                "POST", "/dreambooth", json={**DB_BODY, "tags": [{"key": "dreamlook-batch", "value": "c/x"}]}
            )
        assert len(sim.ledger.jobs) == 1  # paid for, and the client never heard
        status, listed, _ = await http.call("GET", "/jobs/dreambooth")
        assert status == 200 and listed[0]["tags"] == [{"key": "dreamlook-batch", "value": "c/x"}]


async def test_ghost_5xx_creates_the_job_and_answers_502() -> None:
    plan = script(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST_5XX))
    async with Simulator(fast_sim(faults=plan)) as sim, Http(sim) as http:
        status, _, _ = await http.call("POST", "/dreambooth", json=DB_BODY)
        assert status == 502 and len(sim.ledger.jobs) == 1


async def test_scripted_job_failure() -> None:
    plan = script(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.FAIL_JOB, nth=2))
    async with Simulator(fast_sim(faults=plan)) as sim, Http(sim) as http:
        ok, bad = [await http.submit("image_gen", IG_BODY) for _ in range(2)]
        assert (await wait_state(http, "image_gen", ok, {"success", "failure"}))["state"] == "success"
        assert (await wait_state(http, "image_gen", bad, {"success", "failure"}))["state"] == "failure"


async def _image_url(sim: Simulator, http: Http) -> str:
    job_id = await http.submit("dreambooth", {**DB_BODY, "extract_lora": "disabled"})
    job = await wait_state(http, "dreambooth", job_id, {"success"})
    return str(job["dreambooth_result"]["checkpoints"][0]["url"])


async def test_reset_and_truncate_after_n_bytes_and_ignored_range() -> None:
    plan = script(
        ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.RESET, nth=2, arg=1000),
        ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.TRUNCATE, nth=3, arg=5000),
        ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.IGNORE_RANGE, nth=4),
    )
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        url = await _image_url(sim, http)
        sim.set_faults(plan)
        _, whole, _ = await http.raw(url)
        for expected_at_least in (1000, 5000):
            got = bytearray()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with aiohttp.ClientSession() as bare, bare.get(url) as resp:
                    async for chunk in resp.content.iter_any():
                        got += chunk
            assert len(got) == expected_at_least and bytes(got) == whole[:expected_at_least]
        status, body, headers = await http.raw(url, {"Range": "bytes=100-"})
        assert status == 200 and body == whole and "Content-Range" not in headers


async def test_fault_rates_are_reproducible_from_the_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        plan = FaultPlan(rates=FaultRates(server_error=0.3, rate_limited=0.2))
        async with Simulator(fast_sim(seed=seed, faults=plan)) as sim, Http(sim) as http:
            return [(await http.call("GET", "/jobs/image_gen"))[0] for _ in range(40)]

    first, again, other = await statuses(1), await statuses(1), await statuses(2)
    assert first == again != other
    assert {200, 429} <= set(first) and any(s >= 500 for s in first)


async def _receiver(fail_first: int) -> tuple[web.AppRunner, str, MemoryObjectReceiveStream[dict[str, Any]]]:
    send, received = anyio.create_memory_object_stream[dict[str, Any]](100)
    calls = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] <= fail_first:
            return web.Response(status=500)
        await send.send(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/hook", received


async def test_callbacks_on_success_and_failure_retried_when_the_receiver_fails() -> None:
    runner, hook, received = await _receiver(fail_first=1)
    plan = script(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.FAIL_JOB, nth=2))
    try:
        async with Simulator(fast_sim(faults=plan)) as sim, Http(sim) as http:
            ok = await http.submit("image_gen", {**IG_BODY, "callback": hook})
            bad = await http.submit("image_gen", {**IG_BODY, "callback": hook})
            with anyio.fail_after(10):
                payloads = [await received.receive(), await received.receive()]
            by_id = {r["job_id"]: r for r in payloads}
            assert by_id[ok]["state"] == "success" and by_id[ok]["image_gen_results"]
            assert by_id[bad]["state"] == "failure" and by_id[bad]["failure_reason"]
            assert max(c["attempts"] for c in sim.ledger.callbacks) == 2
    finally:
        await runner.cleanup()


async def test_dry_runs_are_not_kept_or_charged_but_still_call_back() -> None:
    runner, hook, received = await _receiver(fail_first=0)
    try:
        async with Simulator(fast_sim(tokens=0)) as sim, Http(sim) as http:
            job_id = await http.submit("dreambooth", {**DB_BODY, "dry_run": True, "callback": hook})
            assert job_id.startswith("TEST_") and sim.ledger.jobs == [] and sim.service.tokens == 0
            status, listed, _ = await http.call("GET", "/jobs/dreambooth")
            assert listed == []
            with anyio.fail_after(10):
                payload = await received.receive()
            assert payload["job_id"] == job_id and payload["dreambooth_result"]["checkpoints"]
            status, body, _ = await http.raw(payload["dreambooth_result"]["checkpoints"][0]["url"])
            assert status == 200 and body[:8]
            # A dry run is still validated.
            status, _, _ = await http.call("POST", "/dreambooth", json={"dry_run": True})
            assert status == 422
    finally:
        await runner.cleanup()
