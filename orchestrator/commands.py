"""A campaign as the commands see it: where its state and files live, and the wiring
of a run (key, lock, optional in-process simulator, API client, downloader, engine,
signals). The CLI calls these and prints what they return.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from . import output
from .api.budget import RequestBudget
from .api.callbacks import CallbackReceiver, derive_secret, parse_listen
from .api.client import ApiClient
from .config import DEFAULT_API_URL, STOP_GRACE_S, RunSettings
from .errors import BucketError, NoSuchJob, PreflightFailed, StoreError, UsageError
from .events import event
from .manifest.load import Manifest, spec_fingerprint
from .models import IN_FLIGHT, MAY_POST, TO_DOWNLOAD, UNPAID, JobState
from .report import render
from .run import preflight
from .run.engine import Engine
from .run.outcome import RunOutcome, StopReason
from .state import StateAt, given_state, held, is_database, open_existing, open_store
from .store import FileRow, JobRow, Store, WorkerRow
from .transfer.bucket import Bucket, BucketUrl, is_bucket_url
from .transfer.file import Downloader
from .transfer.to_bucket import BucketFetcher

STATE_DIR = ".dreamlook-batch"
OUTPUT_DIR = "outputs"
KEY_ENV = "DREAMLOOK_API_KEY"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Paths:
    state: Path  # the SQLite file (unused when `database` is set)
    out: Path  # the local folder (unused when `bucket` is set)
    campaign: str = ""
    database: str | None = None  # a postgresql:// URL: the state several hosts share
    bucket: BucketUrl | None = None  # `--out s3://bucket/prefix`: results go straight there

    @property
    def out_shown(self) -> str:
        """Where the results are, as messages show it."""
        return str(self.bucket) if self.bucket is not None else str(self.out)

    @property
    def at(self) -> StateAt:
        return StateAt(self.campaign, self.state, self.database)


def paths_for(
    manifest: Manifest, state: str | Path | None = None, out: str | Path | None = None, *, simulated: bool = False
) -> Paths:
    """Defaults relative to the manifest's folder, so cron runs from anywhere agree.

    Given as text (as typed), a `scheme://` location the tool does not handle is refused
    here, before `Path` would fold `s3://bucket` into a local `s3:/bucket`. `--state`
    falls back to DREAMLOOK_BATCH_STATE.
    A simulated run keeps its own state: its jobs exist only in a simulator that is
    gone when the run ends, so a real run must never see them.
    """
    # A campaign joined from the database has no manifest file: defaults are under the current folder.
    base = Path.cwd() if manifest.origin else manifest.path.resolve().parent
    name = f"{manifest.campaign}.simulated.db" if simulated else f"{manifest.campaign}.db"
    if isinstance(state, str) or state is None:
        state = given_state(state)
    for option, value in (("--state", state), ("--out", out)):
        if isinstance(value, str):
            preflight.check_scheme(option, value)
    database = state if isinstance(state, str) and is_database(state) else None
    if database is not None and simulated:
        raise UsageError(
            "--simulate keeps its rehearsal in a file of its own (its jobs die with the simulator): "
            "drop --state postgresql://... (and DREAMLOOK_BATCH_STATE) for a rehearsal"
        )
    bucket = None
    if isinstance(out, str) and is_bucket_url(out):
        try:
            bucket = BucketUrl.parse(out)
        except ValueError as exc:
            raise UsageError(f"--out {exc}") from exc
        out = None
    paths = Paths(
        state=(Path(state) if state and database is None else base / STATE_DIR / name).resolve(),
        out=(Path(out) if out else base / OUTPUT_DIR / manifest.campaign).resolve(),
        campaign=manifest.campaign,
        database=database,
        bucket=bucket,
    )
    if database is None:
        preflight.check_state_path(paths.state, name)
    return paths


def forget_simulated_state(paths: Paths) -> None:
    """A new in-process simulator knows none of the old run's jobs: start the rehearsal afresh."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(paths.state) + suffix).unlink(missing_ok=True)


def read_api_key(key_file: Path | None) -> str:
    """The key, without the surrounding whitespace a file or `export` adds. A key with anything
    else that is not printable ASCII is refused here, by its source and never its value: it
    cannot be sent in a header, and an error quoting it would leak it."""
    source = f"the API key file {key_file}" if key_file is not None else KEY_ENV
    if key_file is not None:
        try:
            raw = key_file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{source} is not UTF-8 text; it must hold only the key") from exc
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror}") from exc
    else:
        raw = os.environ.get(KEY_ENV, "")
    key = raw.strip()
    if not key and key_file is not None:
        empty = "is empty" if not raw else "holds only whitespace"
        raise UsageError(f"{source} {empty}; it must hold the key (or leave out --api-key-file to use {KEY_ENV})")
    if not key:
        raise UsageError(f"no API key: set {KEY_ENV} (or use --api-key-file FILE, or --simulate to rehearse)")
    bad = next((i for i, c in enumerate(key) if not (c.isascii() and c.isprintable() and not c.isspace())), None)
    if bad is not None:
        what = (
            "a line break"
            if key[bad] in "\r\n"
            else "a space"
            if key[bad] == " "
            else "a character that is not printable ASCII"
        )
        raise UsageError(
            f"{source} holds {what} at position {bad + 1} of the key; it must hold only the key, on one line"
        )
    return key


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    manifest: Manifest
    paths: Paths
    settings: RunSettings = field(default_factory=RunSettings)
    api_url: str = DEFAULT_API_URL
    api_key_file: Path | None = None
    simulate: Any = None  # SimSettings: run against an in-process simulator
    once: bool = False
    watch: Callable[[Engine], contextlib.AbstractAsyncContextManager[Any]] | None = None  # e.g. a live view
    control: RunControl | None = None  # stop() from outside; None: a control of its own
    signals: bool = False  # the CLI: Ctrl-C and SIGTERM stop the run (a library leaves them to its caller)


@dataclass(frozen=True, slots=True)
class RunResult:
    outcome: RunOutcome
    paths: Paths
    api_requests: int
    sim_url: str | None
    files_done: int = 0
    bytes_done: int = 0


async def run_campaign(request: RunRequest) -> RunResult:
    """Check what can be checked, take the lock, wire everything, run the engine;
    Ctrl-C/SIGTERM stop it cleanly."""
    settings = request.settings
    if request.simulate is None:
        preflight.check_api_url(request.api_url)
    # A dry run writes no files: its checks of the folders create nothing.
    if request.paths.bucket is None:
        preflight.check_output(request.paths.out, create=not settings.dry_run)
    if not settings.dry_run and request.paths.database is None:
        preflight.check_state(request.paths.state)
    lock: contextlib.AbstractAsyncContextManager[Any] = (
        contextlib.nullcontext() if settings.dry_run else held(request.paths.at)
    )
    async with lock:
        # A dry run charges nothing and must leave no state a real run would trust.
        try:
            store = await open_store(request.paths.at, memory=settings.dry_run, lease_s=settings.worker_lease_s)
        except StoreError as exc:  # before anything is sent: a check that failed, exit 2
            raise PreflightFailed(f"--state {request.paths.at}: {exc}. Nothing was sent.") from exc
        try:
            await preflight.check_store(store)
            async with contextlib.AsyncExitStack() as stack:
                sim_url = None
                if request.simulate is not None:
                    from .sim import Simulator  # the client never needs the simulator otherwise

                    sim = await stack.enter_async_context(Simulator(request.simulate))
                    url, key = sim.url, sim.api_key
                    sim_url = sim.url
                    settings = settings.time_scaled(request.simulate.time_scale)
                else:
                    url, key = request.api_url, read_api_key(request.api_key_file)
                budget = RequestBudget(
                    settings.limits.api_requests_per_s,
                    pause_cap_s=settings.retry.retry_after_cap_s,
                    max_wait_s=settings.budget_wait_s,
                )
                api = await stack.enter_async_context(ApiClient(url, key, timeouts=settings.timeouts, budget=budget))
                if not settings.dry_run and await _may_submit(request.manifest, store):  # a dry run pays nothing
                    await preflight.check_api(
                        api, request.manifest.jobs[0].type, settings.preflight_retry, settings.preflight_deadline_s
                    )
                downloader = await stack.enter_async_context(Downloader.for_settings(settings))
                to_bucket = None
                if request.paths.bucket is not None:
                    bucket = await stack.enter_async_context(
                        Bucket(request.paths.bucket, endpoint_url=settings.s3_endpoint_url)
                    )
                    try:  # before anything is paid for: the bucket answers and takes a write
                        await bucket.check_writable()
                    except BucketError as exc:
                        raise PreflightFailed(f"--out {exc}. Nothing was sent.") from exc
                    to_bucket = BucketFetcher(
                        bucket,
                        downloader,
                        part_bytes=settings.range_bytes,
                        parts_in_flight=settings.connections_per_file,
                        file_retry=settings.file_retry,
                    )
                engines: list[Engine] = []  # the receiver starts first: its address goes into the jobs
                base = secret = None
                if settings.listen is not None and not settings.dry_run:
                    _check_no_own_callbacks(request.manifest)
                    secret = derive_secret(key, request.manifest.campaign)
                    host, port = parse_listen(settings.listen)
                    receiver = await stack.enter_async_context(
                        CallbackReceiver(host, port, secret, lambda *hint: engines[0].check.hint(*hint))
                    )
                    base = settings.callback_url or receiver.url
                engine = Engine(
                    request.manifest,
                    store,
                    api,
                    downloader,
                    settings,
                    request.paths.out,
                    callback_base=base,
                    callback_secret=secret,
                    to_bucket=to_bucket,
                )
                engines.append(engine)
                if request.watch is not None:
                    await stack.enter_async_context(request.watch(engine))
                control = request.control or RunControl()
                outcome = await control.drive(
                    engine, once=request.once, grace_s=settings.stop_grace_s, signals=request.signals
                )
                files_done, bytes_done = await store.files_done_total()
                return RunResult(outcome, request.paths, api.requests, sim_url, files_done, bytes_done)
        finally:
            await store.close()


async def check_bucket(url: BucketUrl, endpoint_url: str | None) -> None:
    """`plan`: the bucket answers and takes a write, as `run` checks before anything is paid for."""
    try:
        async with Bucket(url, endpoint_url=endpoint_url) as bucket:
            await bucket.check_writable()
    except BucketError as exc:
        raise PreflightFailed(f"--out {exc}") from exc


async def put_report(
    campaign: str, rows: list[JobRow], files: dict[str, list[FileRow]], url: BucketUrl, endpoint_url: str | None
) -> str:
    """`report` into the bucket, beside the results (its links are relative: they work when the
    bucket is served)."""
    async with Bucket(url, endpoint_url=endpoint_url) as bucket:
        page = render(campaign, rows, files, str(url))
        await bucket.put(url.key("report.html"), page.encode(), content_type="text/html; charset=utf-8")
    return url.url("report.html")


async def _may_submit(manifest: Manifest, store: Store) -> bool:
    """Could this run POST (a job new to the state, pending, or whose POST awaits its outcome)?
    Then the API is checked first; a pass with nothing to send sends nothing extra."""
    states = {row.id: row.state for row in await store.jobs()}
    may_post = MAY_POST
    return any(states.get(spec.id, JobState.PENDING) in may_post for spec in manifest.jobs)


def _check_no_own_callbacks(manifest: Manifest) -> None:
    own = [j.id for j in manifest.jobs if "callback" in j.payload]
    if own:
        raise UsageError(
            f"jobs {', '.join(own[:5])} set their own callback; --listen would replace it. Remove one or the other."
        )


class RunControl:
    """Stopping a run: a first stop finishes what is in flight (for up to the grace seconds) and
    starts nothing new; a second stops at once. The signals of the CLI and `stop()` of the Python
    API both come here. Told to stop, a run that still finished every job is not "interrupted"."""

    def __init__(self, on_stop: Callable[[str], None] | None = None) -> None:
        self.on_stop = on_stop  # the CLI: say at once what happens next
        self._engine: Engine | None = None
        self._scope: anyio.CancelScope | None = None  # made in the run's loop
        self._grace_s = STOP_GRACE_S
        self._told = 0

    def stop(self, by: str = "stop()") -> None:
        """Nothing new starts; what is in flight finishes within the grace seconds. Twice: `stop_now`."""
        if self._told:
            self.stop_now(by)
            return
        self._told = 1
        event(log, "run.stopping", by=by, grace_s=self._grace_s)
        if self.on_stop is not None:
            self.on_stop(
                f"stopping: finishing the files in flight (up to {self._grace_s:g} s); press Ctrl-C again to stop now"
            )
        if self._engine is not None and self._scope is not None:
            self._engine.stop(StopReason.INTERRUPTED)
            self._scope.deadline = min(self._scope.deadline, anyio.current_time() + self._grace_s)

    def stop_now(self, by: str = "stop()") -> None:
        self._told = 2
        event(log, "run.stopping_now", by=by)
        if self.on_stop is not None:
            self.on_stop("stopping now; the state is saved")
        if self._scope is not None:
            self._scope.cancel()

    async def drive(self, engine: Engine, *, once: bool, grace_s: float, signals: bool) -> RunOutcome:
        scope = self._scope = anyio.CancelScope()
        self._engine, self._grace_s = engine, grace_s
        if self._told:  # told before the engine was wired: it starts nothing
            engine.stop(StopReason.INTERRUPTED)
            scope.deadline = anyio.current_time() + grace_s
            if self._told > 1:
                scope.cancel()
        result: list[RunOutcome] = []
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                with scope:
                    result.append(await engine.run(once=once))
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            if signals:
                tg.start_soon(self._watch_signals)
        if not result:  # cut short: what is in flight resumes on the next run
            return RunOutcome(await engine.store.counts(), StopReason.INTERRUPTED, engine.problems)
        outcome = result[0]
        if outcome.stopped_by is StopReason.INTERRUPTED and all(s.terminal for s in outcome.counts):
            return replace(outcome, stopped_by=None)  # told to stop, yet it finished everything
        return outcome

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for number in signals:
                self.stop(signal.Signals(number).name)


# -- read-only views ------------------------------------------------------------------


async def open_existing_store(paths: Paths) -> Store | None:
    return await open_existing(paths.at)


@dataclass(frozen=True, slots=True)
class Plan:
    to_submit: list[str]
    waiting_for_parent: list[str]
    to_check: list[str]
    to_download: list[str]
    bytes_to_download: int
    changed_after_submit: list[str]
    finished: dict[str, int]
    dry_run_note: str = ""
    waiting_in_window: list[tuple[str, float]] = field(default_factory=list)  # lost answers: (job, window end)
    duplicates: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # sent, then removed from the manifest: still followed


async def make_plan(manifest: Manifest, paths: Paths) -> Plan:
    store = await open_existing_store(paths)
    rows: dict[str, JobRow] = {}
    files: list[FileRow] = []
    if store is not None:
        try:
            rows = {r.id: r for r in await store.jobs()}
            files = await store.all_files()
        finally:
            await store.close()
    to_submit: list[str] = []
    waiting: list[str] = []
    to_check: list[str] = []
    to_download: list[str] = []
    changed: list[str] = []
    finished: dict[str, int] = {}
    in_window: list[tuple[str, float]] = []
    for spec in manifest.jobs:
        row = rows.get(spec.id)
        state = row.state if row else JobState.PENDING
        if row and row.sent_fingerprint and row.sent_fingerprint != spec_fingerprint(spec):
            changed.append(spec.id)
        if state is JobState.PENDING:
            parent = rows.get(spec.checkpoint_from) if spec.checkpoint_from else None
            ready = spec.checkpoint_from is None or (parent is not None and parent.checkpoint_id)
            (to_submit if ready else waiting).append(spec.id)
        elif state in IN_FLIGHT:
            to_check.append(spec.id)
            if row is not None and state is JobState.SUBMITTING and (row.reconcile_at or 0.0) > time.time():
                in_window.append((spec.id, row.reconcile_at or 0.0))
        elif state in TO_DOWNLOAD:
            to_download.append(spec.id)
        else:
            finished[state.value] = finished.get(state.value, 0) + 1
    pending_bytes = sum(f.size_bytes or 0 for f in files if not f.done and not f.lost and f.job_id in set(to_download))
    duplicates = [(r.id, r.duplicate_ids) for r in rows.values() if r.duplicate_ids and r.in_manifest]
    listed = {spec.id for spec in manifest.jobs}  # the manifest as it is now, maybe edited since the last run
    removed = [r.id for r in rows.values() if r.id not in listed and r.state not in UNPAID and not r.state.terminal]
    return Plan(
        to_submit,
        waiting,
        to_check,
        to_download,
        pending_bytes,
        changed,
        finished,
        waiting_in_window=in_window,
        duplicates=duplicates,
        removed=removed,
    )


async def status_rows(paths: Paths) -> tuple[list[JobRow], dict[str, list[FileRow]], list[WorkerRow]]:
    """The jobs (the manifest's, then those removed from it after they reached the service: see
    `output.kept_after_removal`), their files, and (a shared campaign) its workers."""
    store = await _store_for_status(paths)
    try:
        rows = [r for r in await store.jobs() if r.in_manifest or output.kept_after_removal(r)]
        rows.sort(key=lambda r: not r.in_manifest)  # stable: each part keeps its order
        return rows, await store.files_by_job(), await store.workers()
    finally:
        await store.close()


async def status_json(campaign: str, paths: Paths, *, page_size: int = output.SUMMARY_PAGE_JOBS) -> AsyncIterator[str]:
    """`status --json`: the record summary.json holds (without the manifest's path), as text
    chunks read from the store a page at a time."""
    store = await _store_for_status(paths)
    try:
        async for chunk in output.campaign_record_json(campaign, store, page_size=page_size):
            yield chunk
    finally:
        await store.close()


async def _store_for_status(paths: Paths) -> Store:
    store = await open_existing_store(paths)
    if store is None:
        raise StoreError(f"no state yet at {paths.at}: nothing has run for this campaign")
    return store


async def settle(manifest: Manifest, paths: Paths, job_id: str, *, remote_id: str | None, resubmit: bool) -> str:
    """A person's word on an `unknown` job: it is `remote_id`, or send it again, or neither (failed)."""
    async with held(paths.at):
        store = await open_existing_store(paths)
        if store is None:
            raise StoreError(f"no state yet at {paths.at}: nothing has run for this campaign, so nothing to settle")
        try:
            await _check_unknown(store, manifest.campaign, job_id)
            if resubmit and job_id not in manifest.by_id:
                raise UsageError(
                    f"job {job_id!r} is not in the manifest any more: --resubmit would leave it pending and no run "
                    "would send it; put it back in the manifest first, or settle it with --remote-id or --give-up"
                )
            if remote_id:
                revived = await store.settle(
                    job_id,
                    JobState.QUEUED,
                    time.time(),
                    remote_id=remote_id,
                    reason=f"settled by hand: it is {remote_id}",
                )
                message = f"{job_id}: recorded as {remote_id}; the next run follows and downloads it"
                return message + _revived_note(revived)
            if resubmit:
                revived = await store.settle(
                    job_id,
                    JobState.PENDING,
                    time.time(),
                    remote_id=None,
                    reason="settled by hand: send again",
                )
                message = (
                    f"{job_id}: will be submitted again by the next run (this may cost tokens twice if it did exist)"
                )
                return message + _revived_note(revived)
            await store.settle(job_id, JobState.FAILED, time.time(), remote_id=None, reason="settled by hand: given up")
            return f"{job_id}: marked failed; it will not be sent again"
        finally:
            await store.close()


async def _check_unknown(store: Store, campaign: str, job_id: str) -> None:
    """`settle` names a job of the campaign that is `unknown`: said plainly otherwise (the store
    checks it again as it writes)."""
    row = next((r for r in await store.jobs_by_id([job_id])), None)
    if row is None:
        raise NoSuchJob(f"no such job {job_id!r} in campaign {campaign!r}: `dreamlook-batch status` lists its jobs")
    if row.state is not JobState.UNKNOWN:
        raise StoreError(
            f"job {job_id!r} is {row.state.value}, not unknown: settle decides only a job whose submission "
            "could not be established"
        )


def _revived_note(revived: tuple[str, ...]) -> str:
    if not revived:
        return ""
    shown = ", ".join(revived[:10]) + (f" and {len(revived) - 10} more" if len(revived) > 10 else "")
    return f"\n{len(revived)} dependent job(s) skipped because of it are pending again: {shown}"


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
