"""The script a user would write instead of dreamlook-batch: plain, fair, and obvious.

asyncio, one semaphore for the active jobs, a fixed poll interval, and a plain
download loop (chunks to the final file name; no resume, no verification, no state).
    python bench/naive.py MANIFEST_JSONL OUT_DIR --api-url URL --max-active N --poll-s S
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp


async def run_job(session: aiohttp.ClientSession, api: str, job: dict[str, Any], out: Path, poll_s: float) -> None:
    kind = job.pop("type")
    job_id = job.pop("id")
    async with session.post(f"{api}/{kind}", json=job) as resp:
        remote = (await resp.json())["job_id"]
    while True:
        await asyncio.sleep(poll_s)
        async with session.get(f"{api}/jobs/{kind}/{remote}") as resp:
            state = await resp.json()
        if state["state"] in ("success", "failure"):
            break
    folder = out / job_id
    folder.mkdir(parents=True, exist_ok=True)
    for group in state.get("image_gen_results") or []:
        for image in group["generated_images"]:
            async with session.get(image["url"]) as resp:
                with open(folder / f"{image['generated_image_id']}.png", "wb") as fh:
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        fh.write(chunk)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--max-active", type=int, default=20)
    parser.add_argument("--poll-s", type=float, default=5.0)
    args = parser.parse_args()
    jobs = [json.loads(line) for line in Path(args.manifest).read_text().splitlines() if line.strip()]
    limit = asyncio.Semaphore(args.max_active)
    headers = {"authorization": f"Bearer {os.environ['DREAMLOOK_API_KEY']}"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=args.max_active)) as s:

        async def one(job: dict[str, Any]) -> None:
            async with limit:
                await run_job(s, args.api_url, job, Path(args.out), args.poll_s)

        await asyncio.gather(*(one(job) for job in jobs))


if __name__ == "__main__":
    asyncio.run(main())
