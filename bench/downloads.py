"""Downloads: our downloader against `curl -o` on the same file, served by nginx (or the simulator).

Each download runs in its own process so its CPU time and peak RSS are its own.
Ours includes what curl does not do: sha256 while streaming, fsync and rename.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT
from .fileserver import big_file

GiB = 1024**3
# One stream proving its prefix every 256 MiB instead of every `--range-mb` (16): what the syncs cost.
PROOFS_256 = "ours-1-stream, proofs every 256 MiB"


def worker(urls: list[str], size: int, out: str, parallel: bool, proof_bytes: int | None = None) -> None:
    """One process downloading `urls` at once; prints wall time, CPU and peak RSS as JSON."""
    from orchestrator.config import RANGE_BYTES
    from orchestrator.models import Artifact, ArtifactKind
    from orchestrator.store.parts import MemoryPartLog
    from orchestrator.transfer.file import Downloader

    async def main() -> float:
        min_bytes = 64 * 1024**2 if parallel else 1 << 62
        async with Downloader(parallel_min_bytes=min_bytes, range_bytes=proof_bytes or RANGE_BYTES) as dl:
            start = time.perf_counter()

            async def one(i: int, url: str) -> None:
                art = Artifact(
                    name=f"file{i}.bin", kind=ArtifactKind.CHECKPOINT, remote_id=str(i), url=url, size_bytes=size
                )

                async def renew() -> Artifact:
                    return art

                await dl.fetch(art, Path(out), renew, MemoryPartLog(), renew_margin_s=0)

            await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))
            return time.perf_counter() - start

    wall = asyncio.run(main())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}))


def _ours(urls: list[str], size: int, parallel: bool, proof_bytes: int | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="dreamlook-bench-") as out:
        code = f"from bench.downloads import worker; worker({urls!r}, {size}, {out!r}, {parallel}, {proof_bytes})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _curl(url: str, *, verify: bool = False, sync: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="dreamlook-bench-") as out:
        target = os.path.join(out, "file.bin")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(["curl", "-sS", "-o", target, url], check=True)
        if verify:
            subprocess.run(["sha256sum", target], check=True, capture_output=True)
        if sync:
            subprocess.run(["sync", target], check=True)  # fsync: the durability ours pays for
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {"wall_s": wall, "cpu_s": cpu}


def _urls(sim_url: str, key: str, count: int) -> list[str]:
    import aiohttp

    async def make() -> list[str]:
        body = {
            "image_urls": ["u"],
            "instance_prompt": "p",
            "base_model": "stable-diffusion-v1-5",
            "steps": 100,
            "extract_lora": "disabled",
        }
        async with aiohttp.ClientSession(headers={"authorization": f"Bearer {key}"}) as s:
            ids = []
            for _ in range(count):
                async with s.post(f"{sim_url}/dreambooth", json=body) as r:
                    ids.append((await r.json())["job_id"])
            await asyncio.sleep(0.5)
            urls = []
            for job_id in ids:
                async with s.get(f"{sim_url}/jobs/dreambooth/{job_id}") as r:
                    urls.append((await r.json())["dreambooth_result"]["checkpoints"][0]["url"])
            return urls

    return asyncio.run(make())


def measure(quick: bool) -> dict[str, object]:
    size = (512 * 1024**2 if quick else 2 * GiB) + 13
    repeats = 1 if quick else 3
    results: dict[str, object] = {"size_gib": size / GiB}
    if shutil.which("curl") is None:
        results["error"] = "curl is not installed"
        return results
    with big_file(size, 1, _urls) as served:
        [url] = served.urls
        results["server"] = served.server
        names = ("curl", "curl+fsync", "curl+sha256sum", "ours-1-stream", "ours-4-ranges", PROOFS_256)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for _ in range(repeats):  # interleaved, so drift of the machine hits all alike
            runs["curl"].append(_curl(url))
            runs["curl+fsync"].append(_curl(url, sync=True))
            runs["curl+sha256sum"].append(_curl(url, verify=True))
            runs["ours-1-stream"].append(_ours([url], size, parallel=False))
            runs["ours-4-ranges"].append(_ours([url], size, parallel=True))
            runs[PROOFS_256].append(_ours([url], size, parallel=False, proof_bytes=256 * 1024**2))
        for name, rs in runs.items():
            best = min(rs, key=lambda r: r["wall_s"])
            results[name] = {
                "gb_per_s": size / best["wall_s"] / 1e9,
                "cpu_s_per_gb": best["cpu_s"] / (size / 1e9),
                "runs_s": [round(r["wall_s"], 2) for r in rs],
            }
    many = 4 if quick else 8
    each = (256 * 1024**2 if quick else GiB) + 13
    with big_file(each, many, _urls) as served:
        r = _ours(served.urls, each, parallel=True)
        rate = many * each / r["wall_s"] / 1e9
        results["concurrent"] = {"files": many, "gib_each": each / GiB, **r, "gb_per_s": rate}
    return results
