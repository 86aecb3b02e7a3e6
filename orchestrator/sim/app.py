"""The simulator's aiohttp routes: the API, signed storage, and a guarded admin route.

API routes check the Bearer key, the per-key rate limit and the fault plan, in that
order. Storage answers as GCS does: XML errors, `Range` with 206, `x-goog-hash`.
Admin routes live under `/_sim/`, which the API never uses, and need the admin token.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import anyio
from aiohttp import web

from . import signing
from .content import crc32c_b64, crc32c_b64_bytes, md5_b64, md5_b64_bytes, png_image
from .service import JobKind, Rejected, Served, StoredFile
from .settings import LIST_DEFAULT_LIMIT, FaultKind, FaultPlan, FaultRates, Route, ScriptedFault

if TYPE_CHECKING:
    from .server import Simulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SIM_KEY: web.AppKey[Simulator] = web.AppKey("simulator")
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
ADMIN_PREFIX = "/_sim/"
LEGACY_PREFIX = "/v1/"
CUT_DELAY_S = 0.02


def _detail(status: int, detail: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


def _xml(status: int, code: str, message: str) -> web.Response:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return web.Response(status=status, text=body, content_type="application/xml")


@web.middleware
async def canonical_paths(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A trailing slash or the legacy `/v1/` prefix answers 307 to the canonical path."""
    path = request.path
    query = f"?{request.query_string}" if request.query_string else ""
    if path.startswith(LEGACY_PREFIX):  # an outdated endpoint: 307 keeps method and body
        raise web.HTTPTemporaryRedirect(path[len(LEGACY_PREFIX) - 1 :] + query)
    if len(path) > 1 and path.endswith("/"):
        raise web.HTTPTemporaryRedirect(path.rstrip("/") + query)
    return await handler(request)


async def _gate(request: web.Request, route: Route) -> tuple[FaultKind, int | None] | web.Response | None:
    """Auth, rate limit and faults for an API request: a Response ends the request."""
    sim = request.app[SIM_KEY]
    sim.service.ledger.requests[route.value] += 1
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not any(
        hmac.compare_digest(key.encode(), k.encode()) for k in sim.settings.api_keys
    ):
        return _detail(401, "Invalid or missing API key" if auth else "Not authenticated")
    wait = sim.faults.throttle(key, sim.now())
    if wait is not None:
        sim.service.ledger.requests["throttled"] += 1  # over the per-key limit: refused
        return _detail(429, "Too many requests", {"Retry-After": str(int(wait))})
    fault = sim.faults.pick(route)
    if fault is None:
        return None
    kind = fault[0]
    if kind is FaultKind.SERVER_ERROR:
        status = (500, 502, 503)[sim.faults.seen[route] % 3]
        return _detail(status, "Internal server error (simulated)")
    if kind is FaultKind.RATE_LIMITED:  # a scripted one may ask for any wait (its `arg`, seconds)
        return _detail(429, "Too many requests", {"Retry-After": str(fault[1] if fault[1] is not None else 1)})
    if kind is FaultKind.RATE_LIMITED_BARE:
        return _detail(429, "Too many requests")
    if kind is FaultKind.SLOW and route is not Route.SUBMIT:
        await anyio.sleep(sim.faults.plan.slow_s)
    return fault


GatedHandler = Callable[[web.Request, FaultKind | None], Awaitable[web.StreamResponse]]


def gated(route: Route) -> Callable[[GatedHandler], Handler]:
    """An API handler behind `_gate`: refused requests never reach it; it gets its fault, if any."""

    def wrap(handler: GatedHandler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            gate = await _gate(request, route)
            if isinstance(gate, web.Response):
                return gate
            return await handler(request, gate[0] if gate else None)

        return run

    return wrap


@gated(Route.SUBMIT)
async def submit(request: web.Request, fault: FaultKind | None) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    kind = JobKind.parse(request.match_info["kind"])
    if kind is None:
        return _detail(404, "Not Found")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _detail(422, [{"loc": ["body"], "msg": "invalid JSON", "type": "value_error.jsondecode"}])
    if not isinstance(body, dict):
        return _detail(422, [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}])
    if fault is FaultKind.LATE_CREATE:
        # Made by the simulator's own task: a client that gave up does not cancel it.
        made = await sim.submit_late(kind, body, sim.faults.plan.late_s)
        if isinstance(made, Rejected):
            return _detail(made.status, made.detail)
        return web.json_response({"job_id": made.job_id})
    try:
        job = sim.service.submit(kind, body, sim.now(), fail=fault is FaultKind.FAIL_JOB)
    except Rejected as rejected:
        return _detail(rejected.status, rejected.detail)
    sim.schedule_callback(job)
    if fault is FaultKind.GHOST and request.transport is not None:
        request.transport.abort()  # the job exists, the client never hears of it
        return web.Response()
    if fault is FaultKind.GHOST_5XX:
        return _detail(502, "Bad gateway (simulated)")
    if fault is FaultKind.SLOW:
        await anyio.sleep(sim.faults.plan.slow_s)
    return web.json_response({"job_id": job.job_id})


@gated(Route.GET)
async def get_job(request: web.Request, fault: FaultKind | None) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    kind = JobKind.parse(request.match_info["kind"])
    job = sim.service.jobs.get(request.match_info["job_id"])
    if kind is None or job is None or job.kind is not kind:
        return _detail(404, "Job not found")
    return web.json_response(sim.renderer.job(job, sim.now()))


@gated(Route.LIST)
async def list_jobs(request: web.Request, fault: FaultKind | None) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    kind = JobKind.parse(request.match_info["kind"])
    if kind is None:
        return _detail(404, "Not Found")
    try:
        limit = int(request.query.get("limit", LIST_DEFAULT_LIMIT))
        offset = int(request.query.get("offset", 0))
        if limit < 1 or offset < 0:
            raise ValueError
    except ValueError:
        msg = "limit must be a positive integer and offset a non-negative one"
        return _detail(422, [{"loc": ["query", "limit"], "msg": msg, "type": "type_error.integer"}])
    if limit > 1:  # a reading of many jobs (a key check asks for one)
        sim.service.ledger.list_readers.append(request.headers.get("user-agent", ""))
    now = sim.now()
    items = [
        sim.renderer.job(j, now, with_tags=sim.settings.list_echoes_tags)
        for j in sim.service.list_jobs(kind, limit, offset)
    ]
    envelope = sim.settings.list_envelope
    return web.json_response({envelope: items} if envelope else items)


async def storage(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    sim.service.ledger.requests[Route.DOWNLOAD.value] += 1
    now = sim.now()
    path = request.rel_url.raw_path  # as signed: percent-escapes kept
    file = sim.service.files.get(path)
    if file is None:
        return _xml(404, "NoSuchKey", "The specified key does not exist.")
    verdict = signing.verify(sim.secret, path, request.query, now)
    if verdict is signing.Verdict.BAD_SIGNATURE:
        return _xml(403, "SignatureDoesNotMatch", "The request signature we calculated does not match.")
    if verdict is signing.Verdict.EXPIRED:
        return _xml(400, "ExpiredToken", "The provided token has expired.")
    if now >= file.deleted_at:
        return _xml(404, "NoSuchKey", "The specified key does not exist.")
    fault = sim.faults.pick(Route.DOWNLOAD) if request.method == "GET" else None
    if fault and fault[0] is FaultKind.SERVER_ERROR:  # storage has its bad moments too
        sim.ledger.downloads.append(Served(file.path, 0, 0, 503, fault[0].value))
        return _xml(503, "ServiceUnavailable", "We encountered an internal error. Please try again.")
    return await _send_file(request, file, fault)


async def _send_file(
    request: web.Request, file: StoredFile, fault: tuple[FaultKind, int | None] | None
) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    kind = fault[0] if fault else None
    if kind in (FaultKind.REWRITE, FaultKind.CORRUPT_HEADER) and file.content is not None:
        sim.service.generations[file.path] += 1
        if kind is FaultKind.CORRUPT_HEADER:
            sim.service.corrupt.add(file.path)
        elif fault and fault[1]:
            sim.service.resized[file.path] += fault[1]
    content = sim.service.content_of(file)
    generation = sim.service.generations[file.path] + 1
    png = png_image(*file.png) if file.png else None
    size = len(png) if png is not None else content.size if content else 0
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": f'"{file.path.rsplit("/", 1)[-1][-16:]}-{generation}"',
        "x-goog-generation": str(generation),
        "Content-Type": "image/png" if png is not None else "application/octet-stream",
    }
    hashes = []  # crc32c of every object; md5 only of one uploaded whole (not composite)
    if png is not None:
        hashes = [f"crc32c={crc32c_b64_bytes(png)}", f"md5={md5_b64_bytes(png)}"]
    elif content is not None:
        hashes = [f"crc32c={crc32c_b64(content)}"]
        if size <= sim.settings.hash_max_bytes:
            hashes.append(f"md5={md5_b64(content)}")
    hashes = [h for h in hashes if sim.settings.crc32c or not h.startswith("crc32c=")]
    if hashes:
        headers["x-goog-hash"] = ",".join(hashes)
    start, end, status = 0, size, 200
    match = RANGE_RE.match(request.headers.get("Range", ""))
    if match and kind is not FaultKind.IGNORE_RANGE:
        first, last = match.groups()
        if first:
            start, end = int(first), min(size, int(last) + 1) if last else size
        elif last:
            start = max(0, size - int(last))
        if start >= size or start >= end:
            sim.ledger.downloads.append(Served(file.path, start, end, 416, None))
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = end - start
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    sim.ledger.downloads.append(Served(file.path, start, end, status, kind.value if kind else None))
    cut = None
    if kind in (FaultKind.RESET, FaultKind.TRUNCATE, FaultKind.GARBLE) and end - start > 1:
        offset = fault[1] if fault and fault[1] is not None else sim.faults.rng.randrange(1, end - start)
        cut = start + offset
    stop = end if cut is None or kind is FaultKind.GARBLE else min(end, cut)
    chunks: Iterable[memoryview | bytes] = (
        [memoryview(png)[start:stop]] if png is not None else content.read(start, stop) if content else []
    )
    if kind is FaultKind.GARBLE and cut is not None:
        chunks, cut = _garbled(chunks, start, cut), None  # the whole body arrives, wrong after the cut
    rate = sim.settings.download_bytes_per_s
    try:
        for chunk in chunks:
            await response.write(chunk)
            if rate:
                await anyio.sleep(len(chunk) / rate)
    except ConnectionResetError:
        return response  # the client hung up: nothing more to send
    if cut is not None and cut < end:
        await anyio.sleep(CUT_DELAY_S)  # the last packets reach the client before the cut
        transport = request.transport
        if transport is None:
            return response  # the client already hung up
        if kind is FaultKind.RESET:
            transport.abort()
        else:
            transport.close()  # a clean close before Content-Length is met
        return response
    await response.write_eof()
    return response


def _garbled(chunks: Iterable[memoryview | bytes], start: int, cut: int) -> Iterator[memoryview | bytes]:
    """The bytes as they are up to `cut`, inverted after it: same length, wrong content."""
    pos = start
    for chunk in chunks:
        keep = max(0, min(len(chunk), cut - pos))
        yield chunk[:keep]
        if keep < len(chunk):
            bad = bytes(chunk[keep:])
            yield (int.from_bytes(bad, "big") ^ ((1 << (8 * len(bad))) - 1)).to_bytes(len(bad), "big")
        pos += len(chunk)


def _admin_ok(request: web.Request) -> bool:
    token = request.app[SIM_KEY].settings.admin_token
    return hmac.compare_digest(request.headers.get("x-sim-admin", "").encode(), token.encode())


async def admin_ledger(request: web.Request) -> web.StreamResponse:
    if not _admin_ok(request):
        return _detail(401, "admin token required")
    sim = request.app[SIM_KEY]
    ledger = sim.service.ledger
    return web.json_response(
        {
            "jobs": [asdict(e) for e in ledger.jobs],
            "requests": dict(ledger.requests),
            "callbacks": ledger.callbacks,
            "tokens": sim.service.tokens,
        }
    )


async def admin_faults(request: web.Request) -> web.StreamResponse:
    """PUT a plan: {"rates": {...}, "script": [{"route", "kind", "nth", ...}], "requests_per_s"}."""
    if not _admin_ok(request):
        return _detail(401, "admin token required")
    try:
        raw = await request.json()
        plan = FaultPlan(
            rates=FaultRates(**raw.get("rates", {})),
            script=tuple(
                ScriptedFault(**{**s, "route": Route(s["route"]), "kind": FaultKind(s["kind"])})
                for s in raw.get("script", [])
            ),
            requests_per_s=raw.get("requests_per_s"),
            **{k: float(raw[k]) for k in ("slow_s", "late_s") if k in raw},
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return _detail(422, f"bad fault plan: {exc}")
    request.app[SIM_KEY].set_faults(plan)
    return web.json_response({"ok": True})


async def not_found(request: web.Request) -> web.StreamResponse:
    return _detail(404, "Not Found")


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(middlewares=[canonical_paths])
    app[SIM_KEY] = sim
    app.router.add_get(f"{ADMIN_PREFIX}ledger", admin_ledger)
    app.router.add_put(f"{ADMIN_PREFIX}faults", admin_faults)
    # [\s\S]: a decoded object name may hold any character, a newline included
    app.router.add_route("GET", r"/storage/{tail:[\s\S]+}", storage)  # GET also answers HEAD
    app.router.add_post("/{kind:dreambooth|image_gen|image-gen|dreambooth_image_gen|dreambooth-image-gen}", submit)
    app.router.add_get("/jobs/{kind}/{job_id}", get_job)
    app.router.add_get("/jobs/{kind}", list_jobs)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
