"""The simulator's API routes over real HTTP: auth, submit validation, read, list, redirects."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator.sim import FaultPlan, FaultRates, Simulator

from .conftest import fast_sim
from .simhttp import DB_BODY, IG_BODY, Http

pytestmark = pytest.mark.anyio
SDXL = "stable-diffusion-xl-v1-0"

# The vendor's example job object (dreamlook-api-docs.txt), its keys at each level.
DOC_JOB_KEYS = {
    "job_type",
    "job_id",
    "state",
    "state_updated",
    "state_running_start",
    "state_running_end",
    "state_queued_start",
    "state_queued_end",
    "queued_duration",
    "running_duration",
    "queueing_state",
    "config",
    "dreambooth_result",
    "image_gen_results",
    "percentage_done",
    "failure_reason",
    "failure_reason_data",
    "thumbnails",
    "tags",
}
DOC_CONFIG_KEYS = {
    "image_urls",
    "instance_prompt",
    "steps",
    "saved_model_format",
    "saved_model_weights_format",
    "base_model",
    "checkpoint_id",
    "crop_method",
    "learning_rate",
    "learning_rate_te",
    "learning_rate_te1",
    "learning_rate_te2",
    "enable_offset_noise",
    "callback",
    "extract_lora",
    "captions_file_url",
    "save_checkpoints_at",
    "text_encoder_training",
    "checkpoint_availability_mode",
    "priority",
}
DOC_CHECKPOINT_KEYS = {
    "checkpoint_id",
    "url",
    "is_extracted_lora",
    "model_type",
    "checkpoint_type",
    "training_step",
    "size_bytes",
    "file_format",
    "availability_mode",
    "is_available",
}


async def wait_state(http: Http, kind: str, job_id: str, states: set[str], limit_s: float = 10) -> dict[str, Any]:
    with anyio.fail_after(limit_s):
        while True:
            job = await http.job(kind, job_id)
            if job["state"] in states:
                return job
            await anyio.sleep(0.01)


async def test_auth_missing_and_wrong_key_are_401() -> None:
    async with Simulator(fast_sim()) as sim:
        async with Http(sim, key="") as anon, Http(sim, key="dl-" + "0" * 32) as wrong:
            status, data, _ = await anon.call("POST", "/dreambooth", json=DB_BODY)
            assert status == 401 and "detail" in data
            status, data, _ = await wrong.call("GET", "/jobs/dreambooth")
            assert status == 401 and data["detail"]
        assert sim.ledger.jobs == []


async def test_submit_prefixes_both_spellings_and_tags_echoed() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        tags = [{"key": "dreamlook-batch", "value": "c/alice"}]
        db = await http.submit("dreambooth", {**DB_BODY, "tags": tags})
        ig = await http.submit("image_gen", IG_BODY)
        ig2 = await http.submit("image-gen", IG_BODY)
        dbig = await http.submit("dreambooth_image_gen", {"dreambooth": DB_BODY, "image_gen": [{"prompt": "x"}]})
        assert db.startswith("db_") and ig.startswith("ig_") and ig2.startswith("ig_") and dbig.startswith("dbig_")
        assert (await http.job("dreambooth", db))["tags"] == tags
        # Either spelling reads either job.
        assert (await http.job("image-gen", ig))["job_id"] == ig
        assert (await http.job("image_gen", ig2))["job_id"] == ig2
        assert (await http.job("dreambooth-image-gen", dbig))["job_id"] == dbig
        assert [e.job_id for e in sim.ledger.jobs] == [db, ig, ig2, dbig]
        assert sim.ledger.tag_values() == {"c/alice": 1}


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("dreambooth", {k: v for k, v in DB_BODY.items() if k != "instance_prompt"}, "instance_prompt"),
        ("dreambooth", {**DB_BODY, "image_urls": []}, "image_urls"),
        ("dreambooth", {**DB_BODY, "steps": "many"}, "steps"),
        ("dreambooth", {**DB_BODY, "base_model": "sd-9000"}, "base_model"),
        ("dreambooth", {**DB_BODY, "text_encoder_training": True}, "text_encoder_training"),
        ("dreambooth", {**DB_BODY, "base_model": SDXL, "learning_rate_te2": 1e-6}, "learning_rate_te2"),
        ("image_gen", {"prompt": "x", "checkpoint_id": "ckp_nope"}, "checkpoint_id"),
        ("image_gen", {"prompt": "x"}, "base_model"),
        ("image_gen", {**IG_BODY, "num_samples": 0}, "num_samples"),
        ("dreambooth_image_gen", {"dreambooth": DB_BODY}, "image_gen"),
    ],
)
async def test_invalid_submissions_get_fastapi_422(kind: str, body: dict[str, Any], field: str) -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        status, data, _ = await http.call("POST", f"/{kind}", json=body)
        assert status == 422
        locs = [d["loc"] for d in data["detail"]]
        assert all(loc[0] == "body" and d["msg"] and d["type"] for loc, d in zip(locs, data["detail"], strict=True))
        assert any(loc[-1] == field for loc in locs), locs
        assert sim.ledger.jobs == []


async def test_malformed_json_is_422_not_a_crash() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        status, data, _ = await http.call(
            "POST", "/dreambooth", data=b"{not json", headers={"content-type": "application/json"}
        )
        assert status == 422 and data["detail"][0]["loc"] == ["body"]


async def test_unknown_and_test_ids_are_404() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        dry = await http.submit("dreambooth", {**DB_BODY, "dry_run": True})
        assert dry.startswith("TEST_")
        for path in (f"/jobs/dreambooth/{dry}", "/jobs/dreambooth/db_00000000", "/jobs/nonsense/x", "/nope"):
            status, data, _ = await http.call("GET", path)
            assert status == 404 and "detail" in data, path


async def test_job_of_other_type_is_404() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        db = await http.submit("dreambooth", DB_BODY)
        status, _, _ = await http.call("GET", f"/jobs/image_gen/{db}")
        assert status == 404


async def test_list_newest_first_with_limit_offset_and_default_50() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        ids = [await http.submit("image_gen", IG_BODY) for _ in range(55)]
        status, page, _ = await http.call("GET", "/jobs/image_gen")
        assert status == 200 and [j["job_id"] for j in page] == ids[::-1][:50]
        status, page, _ = await http.call("GET", "/jobs/image-gen?limit=3&offset=2")
        assert [j["job_id"] for j in page] == ids[::-1][2:5]
        status, _, _ = await http.call("GET", "/jobs/image_gen?limit=-1")
        assert status == 422


async def test_list_variants_envelope_and_no_tags() -> None:
    settings = fast_sim(list_envelope="jobs", list_echoes_tags=False, image_type_spelling="image-gen")
    async with Simulator(settings) as sim, Http(sim) as http:
        ig = await http.submit("image_gen", {**IG_BODY, "tags": [{"key": "k", "value": "v"}]})
        status, data, _ = await http.call("GET", "/jobs/image_gen")
        assert status == 200 and list(data) == ["jobs"]
        assert "tags" not in data["jobs"][0]
        job = await http.job("image_gen", ig)
        assert job["job_type"] == "image-gen" and job["tags"] == [{"key": "k", "value": "v"}]


async def test_trailing_slash_redirects_307_keeping_the_query() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        status, _, headers = await http.call("GET", "/jobs/dreambooth/?limit=2")
        assert status == 307 and headers["Location"] == "/jobs/dreambooth?limit=2"
        status, _, headers = await http.call("POST", "/dreambooth/", json=DB_BODY)
        assert status == 307 and headers["Location"] == "/dreambooth"
        assert sim.ledger.jobs == []


async def test_job_object_matches_the_docs_example_field_by_field() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        db = await http.submit("dreambooth", DB_BODY)
        job = await wait_state(http, "dreambooth", db, {"success"})
        assert set(job) == DOC_JOB_KEYS
        assert set(job["config"]) == DOC_CONFIG_KEYS
        checkpoints = job["dreambooth_result"]["checkpoints"]
        assert [set(c) for c in checkpoints] == [DOC_CHECKPOINT_KEYS, DOC_CHECKPOINT_KEYS]
        full, lora = checkpoints
        assert full["checkpoint_type"] == "checkpoint" and full["is_extracted_lora"] is False
        assert lora["checkpoint_type"] == "lora" and lora["is_extracted_lora"] is True
        assert full["training_step"] == 100 and full["size_bytes"] == sim.settings.checkpoint_bytes
        assert full["checkpoint_id"].startswith("ckp_") and full["is_available"] is True
        assert job["image_gen_results"] is None and job["percentage_done"] == 100
        for key in ("state_updated", "state_running_start", "state_queued_start"):
            assert "T" in job[key] and "+" not in job[key] and not job[key].endswith("Z")  # ISO, no zone


async def test_extract_lora_disabled_and_intermediate_checkpoints() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        db = await http.submit("dreambooth", {**DB_BODY, "extract_lora": "disabled", "save_checkpoints_at": [50]})
        job = await wait_state(http, "dreambooth", db, {"success"})
        steps = [(c["training_step"], c["checkpoint_type"]) for c in job["dreambooth_result"]["checkpoints"]]
        assert steps == [(50, "checkpoint"), (100, "checkpoint")]


async def test_image_results_shape_and_generation_from_a_trained_checkpoint() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        db = await http.submit("dreambooth", DB_BODY)
        trained = await wait_state(http, "dreambooth", db, {"success"})
        ckp = trained["dreambooth_result"]["checkpoints"][0]["checkpoint_id"]
        ig = await http.submit("image_gen", {"prompt": "portrait", "checkpoint_id": ckp, "num_samples": 3, "seed": 7})
        job = await wait_state(http, "image_gen", ig, {"success"})
        [group] = job["image_gen_results"]
        assert group["checkpoint_id"] == ckp and group["config_idx"] == 0
        images = group["generated_images"]
        assert [i["generation_idx"] for i in images] == [0, 1, 2] and [i["seed"] for i in images] == [7, 8, 9]
        assert all(set(i) == {"generated_image_id", "url", "seed", "generation_idx"} for i in images)


async def test_combined_job_trains_then_generates_per_config() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        body = {
            "dreambooth": DB_BODY,
            "image_gen": [{"prompt": "a", "num_samples": 1}, {"prompt": "b", "num_samples": 2}],
        }
        job_id = await http.submit("dreambooth_image_gen", body)
        job = await wait_state(http, "dreambooth_image_gen", job_id, {"success"})
        ckp = job["dreambooth_result"]["checkpoints"][0]["checkpoint_id"]
        groups = job["image_gen_results"]
        assert [(g["config_idx"], len(g["generated_images"]), g["checkpoint_id"]) for g in groups] == [
            (0, 1, ckp),
            (1, 2, ckp),
        ]


async def test_life_cycle_queued_running_with_rising_percentage_then_success() -> None:
    # 100 steps: (30 + 80) service s + 10 s queue, at 200x: ~0.6 s in all.
    async with Simulator(fast_sim(time_scale=200.0, duration_jitter=0.0)) as sim, Http(sim) as http:
        db = await http.submit("dreambooth", DB_BODY)
        seen: list[tuple[str, int]] = []
        with anyio.fail_after(10):
            while not seen or seen[-1][0] != "success":
                job = await http.job("dreambooth", db)
                seen.append((job["state"], job["percentage_done"]))
                await anyio.sleep(0.02)
        states = [s for s, _ in seen]
        assert states[0] == "queued" and "running" in states and states[-1] == "success"
        assert states == sorted(states, key=["queued", "running", "success"].index)
        running = [p for s, p in seen if s == "running"]
        assert running == sorted(running) and running[-1] > running[0]
        assert job["queued_duration"] > 0 and job["running_duration"] > 0


async def test_failures_carry_a_reason() -> None:
    async with Simulator(fast_sim(faults=FaultPlan(rates=FaultRates(job_failure=1.0)))) as sim, Http(sim) as http:
        db = await http.submit("dreambooth", DB_BODY)
        job = await wait_state(http, "dreambooth", db, {"failure"})
        assert job["failure_reason"] and job["failure_reason_data"]["message"]
        assert job["dreambooth_result"] is None and job["percentage_done"] < 100


async def test_capacity_keeps_extra_jobs_queued_longer() -> None:
    async with Simulator(fast_sim(time_scale=500.0, capacity=1, duration_jitter=0.0)) as sim, Http(sim) as http:
        first = await http.submit("image_gen", IG_BODY)
        second = await http.submit("image_gen", IG_BODY)
        a, b = sim.service.jobs[first], sim.service.jobs[second]
        assert b.queued_end >= a.run_end  # the second waits for the only slot
        job = await http.job("image_gen", second)
        assert job["state"] == "queued"


async def test_tokens_are_charged_and_403_when_they_run_out() -> None:
    async with Simulator(fast_sim(tokens=3)) as sim, Http(sim) as http:
        await http.submit("dreambooth", DB_BODY)  # 100 steps: 1 token
        await http.submit("dreambooth", {**DB_BODY, "steps": 200})  # 2 tokens
        status, data, _ = await http.call("POST", "/dreambooth", json=DB_BODY)
        assert status == 403 and "tokens" in data["detail"]
        assert sim.service.tokens == 0 and len(sim.ledger.jobs) == 2
        # Dry runs are never charged, even at zero.
        assert (await http.submit("dreambooth", {**DB_BODY, "dry_run": True})).startswith("TEST_")


async def test_admin_routes_need_the_admin_token() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        await http.submit("image_gen", IG_BODY)
        status, _, _ = await http.call("GET", "/_sim/ledger")
        assert status == 401
        status, data, _ = await http.call("GET", "/_sim/ledger", headers={"x-sim-admin": sim.settings.admin_token})
        assert status == 200 and len(data["jobs"]) == 1 and data["requests"]["submit"] == 1
        plan = {"script": [{"route": "submit", "kind": "5xx", "nth": 1}]}
        status, _, _ = await http.call(
            "PUT", "/_sim/faults", json=plan, headers={"x-sim-admin": sim.settings.admin_token}
        )
        assert status == 200
        status, _, _ = await http.call("POST", "/image_gen", json=IG_BODY)
        assert status >= 500
        status, data, _ = await http.call(
            "PUT", "/_sim/faults", json={"script": [{"kind": "?"}]}, headers={"x-sim-admin": sim.settings.admin_token}
        )
        assert status == 422
