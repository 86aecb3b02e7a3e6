"""The Python API: a campaign built from a manifest file or from jobs made in memory, run inside
the caller's asyncio event loop (anyio on asyncio: aiohttp needs it) with the same state, limits and promises
as the command line, its events followed as they happen, and a result at the end.

    campaign = Campaign.from_jobs("portraits", [{"id": "a", "type": "image_gen", ...}], folder=here)
    async with campaign.open() as run:
        async for ev in run.events:  # the events of the JSON log: same names, same fields
            ...
    print(run.result.counts, run.result.files_done)

The command line's `run` is a client of this module. Signals are the caller's: `run.stop()` does
what a first Ctrl-C does (nothing new starts, what is in flight finishes within the grace
seconds), a second `stop()` or `stop_now()` what a second does; cancelling the block stops at
once too. Either way the state is saved and the next run resumes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import commands, events
from .config import DEFAULT_API_URL, RunSettings
from .errors import ManifestError, Problem, first_error
from .events import Event
from .manifest import load as manifest_load
from .manifest.load import Manifest, load_manifest
from .manifest.sources import LineDict
from .models import JobSpec, JobState
from .run.outcome import ExitCode, StopReason

if TYPE_CHECKING:
    from .run.engine import Engine
    from .sim import SimSettings

log = logging.getLogger(__name__)

EVENT_BUFFER = 10_000  # events held for a reader that lags; past that the newest are dropped, and counted
IN_MEMORY = "jobs given in Python"  # where a problem of an in-memory job is said to be (":N": the Nth job)


@dataclass(frozen=True, kw_only=True)
class CampaignResult:
    """How a run ended: the exit code the CLI would give, the jobs by state, the files."""

    exit_code: ExitCode
    stopped_by: StopReason | None  # None: it ran to its end
    counts: Mapping[JobState, int]  # jobs by state, in the store, after the run
    files_done: int  # files on disk (or in the bucket) and verified, in all runs so far
    bytes_done: int
    problems: tuple[str, ...]  # what a person should know, one line each
    out: str  # where the files are: a folder or s3://bucket/prefix
    api_requests: int
    events_dropped: int = 0  # events not delivered because the reader lagged EVENT_BUFFER behind
    details: commands.RunResult | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK


class CampaignRun:
    """A run in progress: its events as they happen, `stop()`, and its result once the block ends."""

    def __init__(self, receive: MemoryObjectReceiveStream[Event], control: commands.RunControl) -> None:
        self.events: AsyncIterator[Event] = receive  # ends when the run ends
        self._control = control
        self._result: CampaignResult | None = None
        self.dropped = 0

    def stop(self) -> None:
        """What a first Ctrl-C does: nothing new starts; what is in flight finishes within the
        grace seconds (`RunSettings.stop_grace_s`). A second call stops at once."""
        self._control.stop("stop()")

    def stop_now(self) -> None:
        self._control.stop_now("stop_now()")

    @property
    def ended(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> CampaignResult:
        if self._result is None:
            raise RuntimeError("the run has not ended yet: read `result` after its `async with` block")
        return self._result


class Options(TypedDict, total=False):
    """`Campaign`'s keyword options, for `from_manifest` and `from_jobs` alike."""

    settings: RunSettings | None
    state: str | Path | None
    out: str | Path | None
    api_url: str
    api_key_file: Path | None
    simulate: SimSettings | None


class Campaign:
    """A campaign to run: its jobs, where its state and files live, and how to reach the API.

    `state` and `out` default as on the command line: beside the manifest (for jobs made in
    memory, in `folder`): `.dreamlook-batch/<campaign>.db` and `outputs/<campaign>/`. The API key
    comes from DREAMLOOK_API_KEY or `api_key_file`, never from an argument. `simulate` runs
    against an in-process simulator (its own state, fresh each run)."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        settings: RunSettings | None = None,
        state: str | Path | None = None,
        out: str | Path | None = None,
        api_url: str = DEFAULT_API_URL,
        api_key_file: Path | None = None,
        simulate: SimSettings | None = None,
    ) -> None:
        self.manifest = manifest
        self.settings = settings or RunSettings()
        self.api_url, self.api_key_file, self.simulate = api_url, api_key_file, simulate
        self.paths = commands.paths_for(manifest, state, out, simulated=simulate is not None)

    @classmethod
    def from_manifest(cls, path: str | Path, **options: Unpack[Options]) -> Campaign:
        """A manifest file, checked as `validate` checks it (ManifestError lists every problem)."""
        return cls(load_manifest(path), **options)

    @classmethod
    def from_jobs(
        cls,
        campaign: str,
        jobs: Iterable[Mapping[str, Any] | JobSpec],
        *,
        folder: str | Path,
        defaults: Mapping[str, Mapping[str, Any]] | None = None,
        **options: Unpack[Options],
    ) -> Campaign:
        """Jobs made in memory: dicts shaped as a manifest's jobs, or `JobSpec`s; checked as a
        manifest is, with the same messages (a problem names the job and its place in `jobs`)."""
        return cls(_manifest_of(campaign, jobs, Path(folder), defaults), **options)

    @property
    def name(self) -> str:
        return self.manifest.campaign

    @property
    def jobs(self) -> tuple[JobSpec, ...]:
        return self.manifest.jobs

    async def run(self) -> CampaignResult:
        """Until every job is finished and every chosen file is in place (or the run must stop)."""
        async with self.open(buffer=0) as run:
            pass
        return run.result

    async def run_once(self) -> CampaignResult:
        """One pass, as `run --once`: submit what may be, check what is due, fetch what is ready."""
        async with self.open(once=True, buffer=0) as run:
            pass
        return run.result

    @contextlib.asynccontextmanager
    async def open(
        self,
        *,
        once: bool = False,
        buffer: int = EVENT_BUFFER,
        watch: Callable[[Engine], contextlib.AbstractAsyncContextManager[Any]] | None = None,
        control: commands.RunControl | None = None,
        signals: bool = False,
    ) -> AsyncIterator[CampaignRun]:
        """Start the run in the caller's loop; the block's end waits for it. `buffer`: events kept
        for a reader that lags (0: no event stream). `watch`, `control` and `signals` are the
        command line's (a live view, its messages, Ctrl-C)."""
        control = control or commands.RunControl()
        send, receive = anyio.create_memory_object_stream[Event](max(buffer, 0))
        run = CampaignRun(receive, control)

        def hear(ev: Event) -> None:
            if buffer <= 0:
                return
            try:
                send.send_nowait(ev)
            except anyio.WouldBlock:  # never block the run for a reader: the log keeps every event
                run.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the reader went away

        request = commands.RunRequest(
            manifest=self.manifest,
            paths=self.paths,
            settings=self.settings,
            api_url=self.api_url,
            api_key_file=self.api_key_file,
            simulate=self.simulate,
            once=once,
            watch=watch,
            control=control,
            signals=signals,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drive, request, run, send, hear)
                with receive:
                    yield run
        except BaseExceptionGroup as group:  # the caller sees our error, not a task group's wrapping
            raise first_error(group) from group

    async def _drive(
        self,
        request: commands.RunRequest,
        run: CampaignRun,
        send: MemoryObjectSendStream[Event],
        hear: Callable[[Event], None],
    ) -> None:
        token = events.listener.set(hear)  # the tasks of this run, and theirs, tell `hear`
        try:
            with send:
                if self.simulate is not None:
                    commands.forget_simulated_state(self.paths)
                result = await commands.run_campaign(request)
                outcome = result.outcome
                events.event(
                    log,
                    "run.finished",
                    exit_code=int(outcome.exit_code),
                    stopped_by=outcome.stopped_by or "none",
                    files_done=result.files_done,
                    problems=len(outcome.problems),
                    counts={s.value: n for s, n in outcome.counts.items() if n},
                )
                run._result = CampaignResult(
                    exit_code=outcome.exit_code,
                    stopped_by=outcome.stopped_by,
                    counts={s: n for s, n in outcome.counts.items() if n},
                    files_done=result.files_done,
                    bytes_done=result.bytes_done,
                    problems=tuple(outcome.problems),
                    out=self.paths.out_shown,
                    api_requests=result.api_requests,
                    events_dropped=run.dropped,  # counted to the end: run.finished too
                    details=result,
                )
        finally:
            events.listener.reset(token)


def _manifest_of(
    campaign: str, jobs: Iterable[Mapping[str, Any] | JobSpec], folder: Path, defaults: Mapping[str, Any] | None
) -> Manifest:
    """In-memory jobs through the manifest's own checks: one set of rules, one set of messages."""
    raw: list[Any] = []
    for n, job in enumerate(jobs, 1):
        item = LineDict(_as_dict(job) if isinstance(job, JobSpec) else job)
        item.line = n
        raw.append(item)
    doc: dict[str, Any] = {"campaign": campaign, "jobs": raw}
    if defaults is not None:
        doc["defaults"] = defaults
    problems: list[Problem] = []
    name, specs = manifest_load._read_document(Path(IN_MEMORY), doc, campaign, problems)
    manifest_load._check_ids_and_dependencies(specs, problems)
    if any(not p.warning for p in problems):
        raise ManifestError(problems)
    path = folder.resolve() / f"{name} ({IN_MEMORY})"  # not a file: where its state and outputs default
    return Manifest(path, name, tuple(specs), tuple(p for p in problems if p.warning))


def _as_dict(spec: JobSpec) -> dict[str, Any]:
    """A typed spec as a manifest's job, so it is checked as one."""
    job: dict[str, Any] = {"id": spec.id, "type": spec.type.value, **spec.payload}
    if spec.download is not None:
        job["download"] = sorted(spec.download)
    if spec.checkpoint_from is not None:
        job["checkpoint_from"] = spec.checkpoint_from
    return job
