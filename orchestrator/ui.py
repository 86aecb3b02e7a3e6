"""What a person sees: the live view of a run, the end-of-run summary and the status table.

The live view is drawn from the event loop (it reads the state store, which belongs
to that thread) four times a second: counts by state, downloads with bytes, speed and
ETA, and the latest events, failures first. It is used only when stdout is a terminal;
otherwise the log lines are the record.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .logs import scrub
from .models import BAD_ENDINGS, JobState
from .output import NOT_IN_MANIFEST
from .run.outcome import StopReason
from .store import FileRow, JobRow, WorkerRow

if TYPE_CHECKING:
    from .commands import RunResult
    from .run.engine import Engine

REFRESH_S = 0.25
EVENTS_SHOWN = 8
STATE_ORDER = [
    JobState.PENDING,
    JobState.SUBMITTING,
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.DOWNLOADING,
    JobState.DONE,
    JobState.FAILED,
    JobState.INVALID,
    JobState.SKIPPED,
    JobState.UNKNOWN,
    JobState.LOST,
    JobState.DRY_RUN_OK,
]
STATE_STYLE = {JobState.DONE: "green", JobState.DRY_RUN_OK: "green", **{s: "red" for s in BAD_ENDINGS}}


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def clock(when: float) -> str:
    """A moment today, as the user's clock shows it."""
    return time.strftime("%H:%M:%S", time.localtime(when))


def job_note(row: JobRow, now: float) -> str:
    """What the reason column says: a lost answer in its grace window, a duplicate, or the reason."""
    notes = [] if row.in_manifest else [NOT_IN_MANIFEST]
    if row.state is JobState.SUBMITTING and (row.reconcile_at or 0.0) > now:
        notes.append(f"submitting: waiting until {clock(row.reconcile_at or 0.0)} before checking the job list")
    if row.duplicate_ids:
        notes.append(f"DUPLICATE: the service also holds {', '.join(row.duplicate_ids)} with this job's tag")
    if row.reason:
        notes.append(row.reason)
    return "; ".join(notes)


class _Events(logging.Handler):
    """The latest events of the run, for the live view."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: deque[tuple[int, str]] = deque(maxlen=200)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, scrub(record.getMessage())))


class LiveView:
    def __init__(self, engine: Engine, console: Console) -> None:
        self.engine = engine
        self.console = console
        self.started = time.monotonic()
        self._events = _Events()
        self._speed = (time.monotonic(), 0, 0.0)  # (when, bytes then, bytes per second)
        self._live: Live | None = None
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> LiveView:
        logger = logging.getLogger("orchestrator")
        self._level = logger.level
        logger.setLevel(logging.INFO)  # the view shows events; the stderr handler keeps its own level
        logger.addHandler(self._events)
        self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
        self._live.__enter__()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._refresh)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None and self._live is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        try:
            self._live.update(self._render(), refresh=True)
        finally:
            self._live.__exit__(et, e, tb)
            logger = logging.getLogger("orchestrator")
            logger.removeHandler(self._events)
            logger.setLevel(self._level)

    async def _refresh(self) -> None:
        assert self._live is not None
        while True:
            await anyio.sleep(REFRESH_S)
            self._live.update(self._render(), refresh=True)

    def _render(self) -> Group:
        engine = self.engine
        snapshot = engine.snapshot
        counts = snapshot.counts
        head = Text.assemble(
            ("dreamlook-batch ", "bold"),
            (f"campaign {engine.manifest.campaign}", "cyan"),
            f"  {human_seconds(time.monotonic() - self.started)}  ",
            (f"({snapshot.stopped_by})" if snapshot.stopped_by else "", "yellow"),
        )
        states = Text()
        for state in STATE_ORDER:
            if counts.get(state):
                states.append(f"{state.value} {counts[state]}  ", style=STATE_STYLE.get(state, ""))
        parts: list[Text | Table] = [head, states or Text("no jobs")]
        transfers = list(snapshot.transfers)
        now = time.monotonic()
        when, then, rate = self._speed
        if now - when >= 1.0:
            total = snapshot.bytes_fetched
            rate = (total - then) / (now - when)
            self._speed = (now, total, rate)
        if transfers:
            table = Table(
                box=None,
                pad_edge=False,
                title=f"downloads: {len(transfers)} active, {human_bytes(rate)}/s",
                title_justify="left",
                show_header=False,
            )
            for t in sorted(transfers, key=lambda t: t.name)[:10]:
                speed = t.done / max(now - t.started, 1e-6)
                share = f"{100 * t.done / t.total:.0f}%" if t.total else ""
                eta = human_seconds((t.total - t.done) / speed) if t.total and speed > 0 else ""
                size = f"{human_bytes(t.done)} / {human_bytes(t.total)}" if t.total else human_bytes(t.done)
                table.add_row(t.name[:60], size, share, f"{human_bytes(speed)}/s", eta)
            parts.append(table)
        records = list(self._events.records)
        bad = [m for level, m in records if level >= logging.WARNING][-EVENTS_SHOWN:]
        rest = (
            [m for level, m in records if level < logging.WARNING][-(EVENTS_SHOWN - len(bad)) :]
            if len(bad) < EVENTS_SHOWN
            else []
        )
        if bad or rest:
            events = Text()
            for message in bad:
                events.append(f"! {message[:150]}\n", style="red")
            for message in rest:
                events.append(f"  {message[:150]}\n", style="dim")
            parts.append(events)
        return Group(*parts)


def print_summary(console: Console, result: RunResult, *, dry_run: bool, once: bool, elapsed_s: float) -> None:
    """What happened, what is where, and what to do next."""
    outcome = result.outcome
    counts = {s: n for s, n in outcome.counts.items() if n}
    what = "dry run" if dry_run else "pass" if once else "run"
    summary = _tally(counts)
    console.print(
        f"[bold]{what} finished in {human_seconds(elapsed_s)}:[/] {summary or 'no jobs'}"
        f" ({result.api_requests} API requests)"
    )
    for problem in outcome.problems:
        console.print(f"  [red]-[/] {scrub(problem)}")
    if dry_run:
        console.print("nothing was charged; no state was saved")
        return
    if outcome.removed:
        console.print(
            f"{sum(outcome.removed.values())} job(s) {NOT_IN_MANIFEST} ({_tally(outcome.removed)}): "
            "paid for, so still followed and fetched; `dreamlook-batch status MANIFEST` lists them"
        )
    if result.files_done:
        console.print(f"files: {result.files_done} ({human_bytes(result.bytes_done)}) in {result.paths.out_shown}")
    if outcome.stopped_by is StopReason.INTERRUPTED:
        console.print("interrupted: state saved; run the same command again to carry on")
    elif outcome.stopped_by is StopReason.QUOTA:
        console.print("out of tokens: top up, then run again; nothing already paid for was dropped")
    elif outcome.stopped_by is StopReason.AUTH:
        console.print("the API refused the key: fix DREAMLOOK_API_KEY, then run again")
    elif outcome.stopped_by is StopReason.UNREACHABLE:
        console.print("the API could not be reached: the jobs left pending were never sent; run again when it answers")
    if outcome.duplicates:
        console.print(
            f"[red]{outcome.duplicates} job(s) exist twice in the service (paid twice):[/] one of each is downloaded; "
            "`dreamlook-batch status MANIFEST` lists the other remote ids"
        )
    if counts.get(JobState.UNKNOWN) or outcome.removed.get(JobState.UNKNOWN):
        console.print("unknown jobs: check your dreamlook.ai jobs page, then `dreamlook-batch settle MANIFEST JOB ...`")
    if any(counts.get(s) for s in BAD_ENDINGS):
        console.print(
            "`dreamlook-batch status MANIFEST` lists every job with its reason; "
            "`dreamlook-batch report MANIFEST` writes a page to review"
        )


def _tally(counts: dict[JobState, int]) -> str:
    return ", ".join(f"{counts[s]} {s.value}" for s in STATE_ORDER if counts.get(s))


def status_table(rows: Sequence[JobRow], files: dict[str, list[FileRow]], now: float) -> Table:
    table = Table("job", "type", "state", "remote id", "age", "files", "reason", title_justify="left")
    totals: dict[str, int] = {}
    removed: dict[JobState, int] = {}  # counted apart
    for r in rows:
        fs = files.get(r.id, [])
        age = human_seconds(now - r.submitted_at) if r.submitted_at else ""
        file_text = f"{sum(f.done for f in fs)}/{len(fs)}" if fs else ""
        table.add_row(
            r.id,
            r.type,
            Text(r.state.value, style=STATE_STYLE.get(r.state, "")),
            r.remote_id or "",
            age,
            file_text,
            scrub(job_note(r, now)),
        )
        if r.in_manifest:
            totals[r.state.value] = totals.get(r.state.value, 0) + 1
        else:
            removed[r.state] = removed.get(r.state, 0) + 1
    duplicates = sum(1 for r in rows if r.duplicate_ids)
    table.caption = f"{sum(totals.values())} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(totals.items()))
    if removed:
        table.caption += f"; {sum(removed.values())} {NOT_IN_MANIFEST} ({_tally(removed)})"
    if duplicates:
        table.caption += f"; {duplicates} paid twice (duplicate)"
    return table


def workers_table(workers: Sequence[WorkerRow], now: float) -> Table:
    """The workers of a shared campaign (seen in the last day) and what each holds now."""
    table = Table("worker", "host", "pid", "started", "last seen", "submitting", "checking", "downloading", "lists")
    table.title, table.title_justify = "workers", "left"
    for w in workers:
        seen = "stopped" if w.stopped else f"{human_seconds(w.seen_s_ago)} ago"
        table.add_row(
            w.id,
            w.host,
            str(w.pid),
            human_seconds(now - w.started_at) + " ago",
            seen,
            str(w.submitting),
            str(w.checking),
            str(w.downloading),
            "reads" if w.reads_lists else "",
        )
    live = sum(1 for w in workers if not w.stopped)
    table.caption = (
        f"{len(workers)} workers seen in the last day, {live} not stopped; the one that reads the job lists checks"
        " every job at the service"
    )
    return table
