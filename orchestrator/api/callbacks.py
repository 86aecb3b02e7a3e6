"""Callbacks from the API, received in the run's own process and taken only as hints.

Each job's callback URL carries a per-campaign secret derived from the API key
(HMAC), so it is never stored anywhere and still holds after a restart. A callback
with the right secret, for a job of ours, not seen before, only brings that job's
next look forward: a GET with the API key confirms it. Forged, malformed, unknown
and replayed callbacks are refused and logged; none can change a job by itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

from ..errors import UsageError
from ..events import event

log = logging.getLogger(__name__)
CALLBACK_PATH = "/dreamlook-batch/callback"
MAX_BODY_BYTES = 4 * 1024 * 1024
STATUS = {
    "accepted": 200,
    "another-worker": 200,
    "replayed": 409,
    "unknown-job": 404,
}  # another-worker: it polls the job

Hint = Callable[[str, str, str], Awaitable[str]]  # (our job id, remote id, what changed) -> verdict


def derive_secret(api_key: str, campaign: str) -> str:
    return hmac.new(api_key.encode(), f"dreamlook-batch/callback/{campaign}".encode(), hashlib.sha256).hexdigest()[:40]


def callback_url(base: str, secret: str, job_id: str) -> str:
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + CALLBACK_PATH if not parts.path.endswith(CALLBACK_PATH) else parts.path
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode({"job": job_id, "token": secret}), ""))


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {value!r}: give HOST:PORT (a port from 0 to 65535), e.g. 0.0.0.0:8765")
    return host.strip("[]") or "0.0.0.0", int(port)


class CallbackReceiver:
    def __init__(self, host: str, port: int, secret: str, hint: Hint) -> None:
        self.host, self.port = host, port
        self._secret = secret
        self._hint = hint
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.verdicts: Counter[str] = Counter()

    async def __aenter__(self) -> CallbackReceiver:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(CALLBACK_PATH, self._receive)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise UsageError(f"cannot listen for callbacks on {self.host}:{self.port}: {exc.strerror}") from exc
        bound = self._runner.addresses[0]
        host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{host}:{bound[1]}"
        event(log, "callback.listening", url=self.url)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _refuse(self, reason: str, status: int, peer: str | None) -> web.Response:
        self.verdicts[reason] += 1
        event(log, "callback.rejected", reason=reason, peer=peer)
        return web.json_response({"result": reason}, status=status)

    async def _receive(self, request: web.Request) -> web.Response:
        try:
            token = request.query.get("token", "")
            if not hmac.compare_digest(token.encode(), self._secret.encode()):
                return self._refuse("bad-secret", 403, request.remote)
            try:
                body = json.loads(await request.read())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._refuse("malformed", 400, request.remote)
            if not isinstance(body, dict) or not isinstance(body.get("job_id"), str):
                return self._refuse("malformed", 400, request.remote)
            job_id = request.query.get("job", "")
            marker = f"{body.get('state')}/{body.get('state_updated')}"
            verdict = await self._hint(job_id, body["job_id"], marker)
            if verdict != "accepted":
                return self._refuse(verdict, STATUS.get(verdict, 400), request.remote)
            self.verdicts[verdict] += 1
            event(log, "callback.accepted", job_id=job_id, remote_state=str(body.get("state")))
            return web.json_response({"result": verdict})
        except Exception:  # a callback must never take the run down
            event(log, "callback.error", exc_info=True)
            return web.json_response({"result": "error"}, status=500)
