"""`Simulator`: the running simulator as an async context manager, and `serve` for the CLI.

    async with Simulator(SimSettings(time_scale=600)) as sim:
        ...  # talk to sim.url with sim.api_key; read sim.ledger afterwards

It owns the HTTP server, the callback sender (one aiohttp session) and the task
group the callbacks run in; leaving the block stops all three.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp
import anyio
from aiohttp import web
from anyio.abc import TaskGroup

from .app import build_app
from .content import expected_sha256, png_image
from .faults import FaultInjector
from .render import Renderer
from .service import JobKind, Ledger, Rejected, Service, SimJob
from .settings import CALLBACK_ATTEMPTS, CALLBACK_BACKOFF_S, FaultPlan, SimSettings

log = logging.getLogger(__name__)
CALLBACK_TIMEOUT_S = 10.0


class Simulator:
    def __init__(
        self,
        settings: SimSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or SimSettings()
        self.host, self.port = host, port
        self.now = clock
        self.secret = secrets.token_bytes(32)
        self.service = Service(self.settings)
        self.faults = FaultInjector(self.settings.faults, self.settings.seed)
        self.url = ""
        self.renderer = Renderer(self.secret, "", self.settings.image_type_spelling)
        self._stack = contextlib.AsyncExitStack()
        self._tg: TaskGroup | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def api_key(self) -> str:
        return self.settings.api_keys[0]

    @property
    def ledger(self) -> Ledger:
        return self.service.ledger

    def set_faults(self, plan: FaultPlan) -> None:
        """Swap the fault plan while running; scripted `nth` counts from now."""
        self.faults.replace_plan(plan)

    async def __aenter__(self) -> Simulator:
        stack = self._stack
        runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        self.renderer.base_url = self.url
        self._http = await stack.enter_async_context(aiohttp.ClientSession())
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        # Leaving: cancel pending callbacks first (callbacks run last-in, first-out).
        stack.callback(self._tg.cancel_scope.cancel)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def submit_late(self, kind: JobKind, body: dict[str, Any], delay_s: float) -> SimJob | Rejected:
        """The late_create fault: the job is made `delay_s` from now by a task of the simulator's
        own, so it is made even when the request that asked for it is gone."""
        assert self._tg is not None
        made: list[SimJob | Rejected] = []
        ready = anyio.Event()

        async def create() -> None:
            try:
                await anyio.sleep(delay_s)
                job = self.service.submit(kind, body, self.now())
                self.schedule_callback(job)
                made.append(job)
            except Rejected as rejected:
                made.append(rejected)
            finally:
                ready.set()

        self._tg.start_soon(create)
        await ready.wait()
        if not made:
            raise RuntimeError("the simulator stopped before a late submission was made")
        return made[0]

    # -- callbacks ----------------------------------------------------------------

    def schedule_callback(self, job: SimJob) -> None:
        if job.callback and self._tg is not None:
            self._tg.start_soon(self._deliver, job)

    async def _deliver(self, job: SimJob) -> None:
        assert self._http is not None and job.callback is not None
        await anyio.sleep(max(0.0, job.end - self.now()))
        record: dict[str, Any] = {"job_id": job.job_id, "attempts": 0, "delivered": False}
        self.ledger.callbacks.append(record)
        delay = CALLBACK_BACKOFF_S
        for _ in range(CALLBACK_ATTEMPTS):
            record["attempts"] += 1
            body = self.renderer.job(job, self.now())
            try:
                timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S)
                async with self._http.post(job.callback, json=body, timeout=timeout) as resp:
                    if resp.status < 300:
                        record["delivered"] = True
                        return
                    record["last_status"] = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                record["last_error"] = type(exc).__name__
            await anyio.sleep(delay)
            delay *= 2
        log.info("sim.callback_gave_up job_id=%s", job.job_id)

    # -- for tests ----------------------------------------------------------------

    def expected_files(self, job_id: str) -> dict[str, str]:
        """File name (as in its URL) -> the sha256 its bytes must have."""
        job = self.service.jobs[job_id]
        out: dict[str, str] = {}
        files = [c.file for c in job.checkpoints]
        files += [im.file for _, images in job.image_sets for im in images]
        for f in files:
            name = f.path.rsplit("/", 1)[-1]
            content = self.service.content_of(f)
            if content is not None:
                out[name] = expected_sha256(content)
            elif f.png is not None:
                out[name] = _sha256(png_image(*f.png))
        return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def serve(settings: SimSettings, host: str, port: int, ready: Callable[[Simulator], None]) -> None:
    """Run until cancelled (Ctrl-C): the `dreamlook-batch sim` command."""
    async with Simulator(settings, host=host, port=port) as sim:
        ready(sim)
        await anyio.sleep_forever()
