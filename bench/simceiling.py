"""The simulator's own ceiling, so that no other figure is secretly the simulator's limit.

Job GETs per second (one simulator process, a load generator in another) and the
rate at which it streams a 1 GiB file to `curl -o /dev/null` on loopback.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time

import aiohttp

from .common import ROOT, sim_process

GET_CONNECTIONS = 64


async def _hammer(url: str, key: str, ids: list[str], seconds: float) -> dict[str, float]:
    headers = {"authorization": f"Bearer {key}"}
    done = 0
    errors = 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=GET_CONNECTIONS)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:

        async def worker(i: int) -> None:
            nonlocal done, errors
            n = i
            while time.perf_counter() < stop:
                async with session.get(f"{url}/jobs/dreambooth/{ids[n % len(ids)]}") as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1
                    else:
                        errors += 1
                n += GET_CONNECTIONS

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(GET_CONNECTIONS)))
        elapsed = time.perf_counter() - start
    return {"gets_per_s": done / elapsed, "errors": errors, "seconds": elapsed}


async def _make_jobs(url: str, key: str, n: int) -> tuple[list[str], str]:
    headers = {"authorization": f"Bearer {key}"}
    body = {
        "image_urls": ["https://example.com/1.jpg"],
        "instance_prompt": "p",
        "base_model": "stable-diffusion-v1-5",
        "steps": 100,
    }
    async with aiohttp.ClientSession(headers=headers) as session:
        ids = []
        for _ in range(n):
            async with session.post(f"{url}/dreambooth", json=body) as resp:
                ids.append((await resp.json())["job_id"])
        await asyncio.sleep(0.5)
        async with session.get(f"{url}/jobs/dreambooth/{ids[0]}") as resp:
            job = await resp.json()
    return ids, job["dreambooth_result"]["checkpoints"][0]["url"]


def gets_worker(url: str, key: str, seconds: float) -> None:
    """Run in a separate process: print one JSON line of results."""

    async def main() -> None:
        ids, _ = await _make_jobs(url, key, 200)
        await _hammer(url, key, ids, 1.0)  # warm-up
        print("start", flush=True)  # the parent reads the simulator's CPU now and at the end
        print(json.dumps(await _hammer(url, key, ids, seconds)), flush=True)

    asyncio.run(main())


def measure(quick: bool) -> dict[str, object]:
    seconds = 3.0 if quick else 8.0
    results: dict[str, object] = {}
    with sim_process("--time-scale", "100000") as sim:
        code = f"from bench.simceiling import gets_worker; gets_worker({sim.url!r}, {sim.key!r}, {seconds})"
        worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "start"
        cpu0 = sim.cpu_s()
        line = worker.stdout.readline()
        cpu1 = sim.cpu_s()
        worker.wait(30)
        got = json.loads(line)
        results.update(got)
        # Near 1.0: the simulator's one core was the limit; lower: the load generator was.
        results["sim_cpu_share"] = (cpu1 - cpu0) / got["seconds"]
    size = 1024**3
    with sim_process("--time-scale", "100000", "--checkpoint-bytes", str(size)) as sim:
        _, file_url = asyncio.run(_make_jobs(sim.url, sim.key, 1))
        curl = shutil.which("curl")
        if curl:
            runs = []
            for _ in range(1 if quick else 3):
                t = time.perf_counter()
                subprocess.run([curl, "-sS", "-o", "/dev/null", file_url], check=True)
                runs.append(size / (time.perf_counter() - t) / 1e9)
            results["stream_gb_per_s"] = max(runs)
            results["stream_runs_gb_per_s"] = [round(r, 2) for r in runs]
    return results
