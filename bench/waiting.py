"""Waiting: API requests per job and the lag between a job's end and our noticing it.

One campaign (training 10 to 30 min, image generation 30 s to 3 min, time-scaled) run
three ways, each in a fresh process against a simulator with the same seed, so every
way meets the same jobs with the same durations: our default, our default with
callbacks, and the fixed-interval baseline public clients use (20 s training, 5 s
images, one GET per job). Lag is in service seconds (real seconds x time scale).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from .common import ROOT

WAYS = ("ours", "ours+callbacks", "fixed 20 s / 5 s")


def _manifest(folder: Path, jobs: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["campaign: wait", "jobs:"]
    for i in range(jobs // 2):
        steps = rng.randint(700, 2200)  # 30 + 0.8 s a step: 10 to 30 minutes
        lines.append(
            f"- {{id: t{i:03d}, type: dreambooth, instance_prompt: p, image_urls: [u], "
            f"base_model: stable-diffusion-v1-5, steps: {steps}, download: [lora]}}"
        )
    for i in range(jobs - jobs // 2):
        samples = rng.randint(5, 55)  # 15 + 3 s a sample: 30 s to 3 minutes
        lines.append(
            f"- {{id: g{i:03d}, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5, "
            f"num_samples: {samples}, width: 64, height: 64, download: none}}"
        )
    path = folder / "wait.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def worker(way: str, jobs: int, scale: float, seed: int) -> None:
    """One way, in its own process: prints a JSON line of results."""
    import sqlite3

    import anyio

    from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
    from orchestrator.config import Limits, PollPolicy, RunSettings
    from orchestrator.sim import SimSettings, Simulator

    async def main(folder: Path) -> dict[str, object]:
        manifest = load_manifest(_manifest(folder, jobs, seed))
        sim_settings = SimSettings(
            seed=seed,
            time_scale=scale,
            checkpoint_bytes=64 * 1024,
            lora_bytes=16 * 1024,
            image_max_px=16,
            retention_s=1e9,
        )
        limits = Limits(max_active=jobs, submit_rate_per_s=1000.0, api_requests_per_s=1000.0, max_downloads=8)
        settings = RunSettings(limits=limits)
        if way == "ours+callbacks":
            settings = replace(settings, listen="127.0.0.1:0")
        elif way.startswith("fixed"):
            settings = replace(
                settings, poll=PollPolicy.fixed(20.0), image_poll=PollPolicy.fixed(5.0), batch_status=False
            )
        settings = settings.time_scaled(scale)
        async with Simulator(sim_settings) as sim:
            key = folder / "key"
            key.write_text(sim.api_key)
            paths = paths_for(manifest)
            result = await run_campaign(
                RunRequest(manifest=manifest, paths=paths, settings=settings, api_url=sim.url, api_key_file=key)
            )
            ends = {e.tags[-1]["value"].split("/", 1)[1]: sim.service.jobs[e.job_id].end for e in sim.ledger.jobs}
            requests = dict(sim.ledger.requests)
        with sqlite3.connect(paths.state) as db:
            noticed = dict(db.execute("SELECT id, ended_at FROM jobs"))
        lags = sorted((noticed[j] - ends[j]) * scale for j in ends)
        api = requests.get("submit", 0) + requests.get("get", 0) + requests.get("list", 0)
        return {
            "way": way,
            "exit": result.outcome.exit_code,
            "jobs": len(ends),
            "api_requests": api,
            "requests": requests,
            "requests_per_job": api / len(ends),
            "lag_median_s": statistics.median(lags),
            "lag_p95_s": lags[int(0.95 * (len(lags) - 1))],
        }

    with tempfile.TemporaryDirectory(prefix="dreamlook-bench-") as tmp:
        print(json.dumps(anyio.run(main, Path(tmp))))


def measure(quick: bool) -> dict[str, object]:
    jobs, scale = (100, 400.0) if quick else (200, 200.0)
    results: dict[str, object] = {"jobs": jobs, "time_scale": scale}
    for way in WAYS:
        code = f"from bench.waiting import worker; worker({way!r}, {jobs}, {scale}, 5)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        results[way] = json.loads(done.stdout.strip().splitlines()[-1])
    return results
