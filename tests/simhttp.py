"""A bare aiohttp client for talking to the simulator in tests, as any API user would."""

from __future__ import annotations

from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from orchestrator.sim import Simulator

DB_BODY: dict[str, Any] = {
    "image_urls": ["https://example.com/1.jpg", "https://example.com/2.jpg"],
    "instance_prompt": "photo of ukj person",
    "base_model": "stable-diffusion-v1-5",
    "steps": 100,
}
IG_BODY: dict[str, Any] = {"prompt": "a castle", "base_model": "stable-diffusion-v1-5", "num_samples": 2}


class Http:
    def __init__(self, sim: Simulator, key: str | None = None) -> None:
        self.sim = sim
        self.key = sim.api_key if key is None else key
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Http:
        headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
        self.session = aiohttp.ClientSession(headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, CIMultiDictProxy[str]]:
        assert self.session is not None
        url = path if path.startswith("http") else self.sim.url + path
        async with self.session.request(method, url, allow_redirects=False, **kw) as resp:
            body = await resp.read()
            try:
                data: Any = await resp.json(content_type=None)
            except ValueError:
                data = body
            return resp.status, data, resp.headers

    async def submit(self, kind: str, body: dict[str, Any]) -> str:
        status, data, _ = await self.call("POST", f"/{kind}", json=body)
        assert status == 200, data
        return str(data["job_id"])

    async def job(self, kind: str, job_id: str) -> dict[str, Any]:
        status, data, _ = await self.call("GET", f"/jobs/{kind}/{job_id}")
        assert status == 200, data
        return dict(data)

    async def raw(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        assert self.session is not None
        async with aiohttp.ClientSession() as bare:  # storage: no API key
            async with bare.get(url, headers=headers or {}) as resp:
                return resp.status, await resp.read(), resp.headers
