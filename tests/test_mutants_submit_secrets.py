"""The submit stage (run/submit.py) against the real simulator and a real state file: what it
keeps of a sent body. The callback URL carries the campaign's secret and is never stored."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from orchestrator.api.client import ApiClient
from orchestrator.config import RunSettings
from orchestrator.manifest.load import load_manifest, spec_fingerprint
from orchestrator.run.context import JobObjects, RunContext
from orchestrator.run.resolve import ResolveStage
from orchestrator.run.submit import SubmitStage
from orchestrator.sim import Simulator
from orchestrator.store import SqliteStore

from .conftest import fast_sim, write

MANIFEST = "campaign: camp\njobs:\n- {id: j0, type: image_gen, base_model: stable-diffusion-v1-5, prompt: p0}\n"
SECRET = "s3cr3t-callback-token-0123456789abcdef"


def state_bytes(folder: Path) -> list[bytes]:
    """The state file and whatever SQLite keeps beside it (WAL, shared memory)."""
    return [path.read_bytes() for path in folder.glob("camp.db*")]


@pytest.mark.anyio
async def test_a_sent_callback_url_and_its_secret_never_reach_the_state_file(tmp_path: Path) -> None:
    now = time.time()
    manifest = load_manifest(write(tmp_path / "camp.yaml", MANIFEST))
    settings = RunSettings()
    async with Simulator(fast_sim(time_scale=1.0)) as sim:
        store = await SqliteStore.open(tmp_path / "camp.db")
        try:
            await store.sync_manifest("camp", manifest.jobs, [spec_fingerprint(s) for s in manifest.jobs], now)
            await store.adopt([], ["j0"], now)  # its tag was looked for: it may be sent
            async with ApiClient(sim.url, sim.api_key) as api:
                ctx = RunContext(
                    manifest=manifest,
                    store=store,
                    api=api,
                    settings=settings,
                    now=lambda: now,
                    jobs=JobObjects(store, api, settings),
                )
                stage = SubmitStage(
                    ctx, ResolveStage(ctx), callback_base="http://127.0.0.1:9/hooks", callback_secret=SECRET
                )
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        assert await stage.start_due(tg, stopping=False) == 1
            row = await store.job("j0")
        finally:
            await store.close()
    assert row.remote_id is not None and row.sent_payload is not None
    kept = json.loads(row.sent_payload)
    assert "callback" not in kept and kept["prompt"] == "p0"
    sent = sim.service.jobs[row.remote_id].callback
    assert sent is not None and SECRET in sent  # it was sent...
    blobs = state_bytes(tmp_path)
    assert blobs and not any(SECRET.encode() in b for b in blobs)  # ...and is in no byte of the state
