"""The only HTTP client of the dreamlook.ai API. Maps statuses to the error tree; no policy.

One `aiohttp.ClientSession` per client, opened and closed by `async with`. Redirects
(307/308: "outdated endpoint") are followed here, keeping method and body, and only
to the same origin, so the API key never goes to another host. Every request first
takes its share of the run's `RequestBudget`; a 429 pauses that budget for everyone.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from ..config import Timeouts
from ..errors import (
    ApiError,
    AuthError,
    InvalidJob,
    NotFound,
    NotSent,
    QuotaError,
    RateLimited,
    ServerError,
    TransportError,
)
from ..models import JobType
from ..transfer.urls import redact
from .budget import RequestBudget

MAX_REDIRECTS = 5
LIST_PAGE = 50  # the job list's page: the API's default, and what every reader of the list asks for


def user_agent() -> str:
    """The tool, its version and this process: the service's logs can tell the workers apart."""
    from .. import __version__  # the package's __init__ imports this module: read it when called

    return f"dreamlook-batch/{__version__} (pid {os.getpid()})"


# aiohttp errors raised before a single byte of the request can have left: no connection
# (refused, DNS, TLS handshake, proxy, connect timeout) or a URL it would not even try.
# A reset, a disconnect or a read timeout after connecting is *not* among them: the
# server may have read the request and acted on it.
NEVER_SENT: tuple[type[Exception], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.InvalidURL,
    aiohttp.NonHttpUrlClientError,
)


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds, from either of its forms (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _why_not_sent(exc: Exception, url: str) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {url}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"cannot connect to {url}: no connection within the connect timeout"
    return f"{url} is not a URL the client can send to ({type(exc).__name__})"


class ApiClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeouts: Timeouts | None = None,
        budget: RequestBudget | None = None,
        connections: int = 20,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._timeouts = timeouts or Timeouts()
        self.budget = budget
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> ApiClient:
        # `connect` bounds the wait for a pooled connection too: a request waits at most that
        # long before its first byte, and one that times out there was never sent.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._timeouts.connect_s,
            sock_connect=self._timeouts.connect_s,
            sock_read=self._timeouts.api_read_s,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=self._connections),
            headers={"authorization": f"Bearer {self._key}", "user-agent": user_agent()},
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    # -- endpoints ------------------------------------------------------------------

    async def submit(self, job_type: JobType, body: Mapping[str, Any], *, send_by: float | None = None) -> str:
        """POST a job; its id. Raises NotSent only when nothing can have reached the API: also when
        the request budget held it past `send_by` (time.monotonic()), the last moment the caller
        may still send it (a shared campaign's lease must cover the whole POST)."""
        answer = await self._request(
            "POST", f"/{job_type.value}", body=body, what=f"submit {job_type}", send_by=send_by
        )
        job_id = answer.get("job_id") or answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(job_id, str) or not job_id:
            # The job may exist: the caller must reconcile, as with a lost answer.
            raise TransportError(f"submit {job_type}: the answer has no job_id")
        return job_id

    async def get_job(self, job_type: JobType, job_id: str) -> dict[str, Any]:
        # Quoted whole: an id typed by a person (`jobs get`, `settle --remote-id`) names one job,
        # never another path or a query (`db_1?x=1`, `../x`).
        path = f"/jobs/{job_type.value}/{quote(job_id, safe='')}"
        answer = await self._request("GET", path, what=f"get {job_id}")
        if not isinstance(answer, dict):
            raise ServerError(200, "the job is not a JSON object", f"get {job_id}")
        return answer

    async def list_jobs(
        self, job_type: JobType, *, limit: int | None = None, offset: int | None = None
    ) -> list[dict[str, Any]]:
        """Newest first. Accepts a bare list or one wrapped in jobs/items/results/data."""
        params = {k: str(v) for k, v in (("limit", limit), ("offset", offset)) if v is not None}
        answer = await self._request("GET", f"/jobs/{job_type.value}", params=params, what=f"list {job_type}")
        if isinstance(answer, dict):
            answer = next(
                (answer[k] for k in ("jobs", "items", "results", "data") if isinstance(answer.get(k), list)),
                None,
            )
        if not isinstance(answer, list):
            raise ServerError(200, "the job list is not a JSON list", f"list {job_type}")
        return [item for item in answer if isinstance(item, dict)]

    # -- transport ------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        send_by: float | None = None,
    ) -> Any:
        if self._session is None:
            raise RuntimeError("use ApiClient in `async with`")
        if self.budget is not None:
            await self.budget.acquire()
        if send_by is not None and time.monotonic() > send_by:
            raise NotSent(f"{what}: not sent: it waited for the request budget past the moment it could still go")
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else None
        origin = urlsplit(self.base_url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            self.requests += 1
            try:
                async with self._session.request(
                    method, url, data=data, params=params, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    text = await resp.text()
                    location = resp.headers.get("Location")
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
            except NEVER_SENT as exc:
                raise NotSent(f"{what}: {_why_not_sent(exc, redact(url))}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise TransportError(f"{what}: no answer from the API ({type(exc).__name__}: {exc})") from exc
            if status in (307, 308) and location:
                target = urljoin(url, location)
                if urlsplit(target)[:2] != origin:
                    raise ApiError(status, f"redirect to another host ({urlsplit(target).netloc}) refused", what)
                url = target
                continue
            return self._answer(status, text, what, retry_after)
        raise ApiError(307, f"more than {MAX_REDIRECTS} redirects", what)

    def _answer(self, status: int, text: str, what: str, retry_after: float | None) -> Any:
        try:
            payload = json.loads(text) if text else None
        except json.JSONDecodeError:
            payload = None
        if 200 <= status < 300:
            if payload is None:
                raise ServerError(status, "the answer is not JSON", what)
            return payload
        detail = payload.get("detail", payload) if isinstance(payload, dict) else (text[:200] or "(no body)")
        if status == 429 and self.budget is not None:
            self.budget.pause(retry_after if retry_after is not None else 1.0)
        error: type[ApiError] = {401: AuthError, 403: QuotaError, 404: NotFound, 422: InvalidJob}.get(status, ApiError)
        if status == 429:
            raise RateLimited(status, detail, what, retry_after)
        if status >= 500:
            error = ServerError
        raise error(status, detail, what)
