"""The live view of a run in a terminal: what the jobs at the service are doing and when they
should end, the files in flight, and the latest events told as sentences.

It is drawn from the event loop four times a second, each time from a fresh `Snapshot` of the
engine (the view itself never reads the store). Used only when stdout is a terminal; otherwise
the log lines are the record.

What its figures mean (its footer says it too):
- a job's progress is the API's `percentage_done`, carried forward between looks at the job's
  own pace so far (never to 100%: only the API says a job ended); its end is the prediction the
  engine schedules its next look by (run/schedule.py);
- a file's share is the bytes of it on hand over its size (bytes a broken range lost are not
  counted twice);
- every speed is bytes received over the network in the last `SPEED_WINDOW_S` seconds, over
  them, a file's and the total alike: the total is the sum of the files' speeds (with the files
  that ended within those seconds).
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .events import Event
from .logs import RECORD_ATTR, scrub
from .models import JobState
from .run.outcome import JobProgress, Snapshot
from .transfer.progress import Transfer
from .ui import STATE_ORDER, STATE_STYLE, human_bytes, human_seconds

if TYPE_CHECKING:
    from .run.engine import Engine

log = logging.getLogger(__name__)
REFRESH_S = 0.25
EVENTS_SHOWN = 8
JOBS_SHOWN = 8
FILES_SHOWN = 8
SPEED_WINDOW_S = 3.0  # speeds: bytes received in this many seconds, over them
BAR_CELLS = 20
FOOTER = (
    f"speeds: bytes received in the last {SPEED_WINDOW_S:g} s (the total also counts files that ended in them); "
    "job %: the API's percentage_done, carried forward at the job's pace; ends: predicted from that pace or "
    "from similar jobs"
)
_FROM_URL = re.compile(r" from https?://\S+")

# -- events as sentences ------------------------------------------------------------------

Fields = Mapping[str, Any]
_SENTENCES: dict[str, Callable[[Fields], str | None]] = {
    "job.submitted": lambda f: f"{f['job_id']} submitted (remote id {f['remote_id']})",
    "job.succeeded": lambda f: f"{f['job_id']} finished at the service; {_files(f['files'])} to fetch",
    "job.done": lambda f: f"{f['job_id']} done: {_files(f['files'])} saved and checked",
    "file.done": lambda f: f"{f['job_id']}: {f['file']} saved ({human_bytes(float(f['bytes']))})",
    "job.problem": lambda f: f"{f['job_id']}: {_reason(f)}",
    "job.problem_again": lambda f: f"{f['job_id']}: {_reason(f)}",
    "job.adopted": lambda f: f"{f['job_id']} found at the service as {f['remote_id']}: not sent again",
    "job.not_sent": lambda f: f"{f['job_id']} not sent: {_reason(f)}",
    "job.reconcile_waiting": lambda f: (
        f"{f['job_id']}: the answer to its submission was lost; it is looked for in the job list after {f['until']}"
    ),
    "job.reconciled": lambda f: f"{f['job_id']}: {f['verdict']} ({_reason(f)})",
    "job.submit_unclear": lambda f: (
        f"{f['job_id']}: its submission got no clear answer ({_reason(f)}); it is looked for, never sent again blindly"
    ),
    "job.check_failed": lambda f: f"{f['job_id']}: could not read its state ({_reason(f)}); will look again",
    "job.unknown_state": lambda f: f"{f['job_id']}: the API reports a state it does not document ({f['remote_state']})",
    "job.duplicate": lambda f: (
        f"{f['job_id']} exists twice at the service (paid twice): {f['remote_id']} is kept, also "
        f"{', '.join(map(str, f['duplicate_ids']))}"
    ),
    "job.taken_over": lambda f: f"{f['job_id']}: another worker holds it now",
    "job.answer_after_takeover": lambda f: f"{f['job_id']}: answered after another worker took it over",
    "job.files_restored": lambda f: f"{f['job_id']}: job.json and SHA256SUMS written again from the state",
    "file.requeued": lambda f: f"{f['file']} ({f['job_id']}) failed: {_reason(f)}; it is fetched again",
    "file.missing": lambda f: f"{f['file']} ({f['job_id']}) is missing on disk; fetching it again",
    "download.url_renewed": lambda f: f"{f['file']}: its link expired; fetched a fresh one",
    "download.object_changed": lambda f: f"{f['file']} changed at the service; starting it over",
    "download.ranges_ignored": lambda f: f"{f['file']}: the server ignores ranges; one stream instead",
    "api.retry": lambda f: f"{f['what']}: attempt {f['attempt']} failed ({_reason(f)}); {_again(f['wait_s'])}",
    "download.retry": lambda f: _SENTENCES["api.retry"](f),
    "download.range_retry": lambda f: _SENTENCES["api.retry"](f),
    "store.retry": lambda f: _SENTENCES["api.retry"](f),
    "api.retry_after_capped": lambda f: f"the API asked for a pause of {f['asked_s']} s; pausing {f['used_s']} s",
    "callback.accepted": lambda f: f"callback: {f['job_id']} is {f['remote_state']}; looking at it now",
    "callback.rejected": lambda f: f"a callback was refused ({_reason(f)})",
    "callback.listening": lambda f: f"listening for callbacks at {f['url']}",
    "campaign.adopted": lambda f: (
        f"{f['count']} job(s) found at the service from an earlier run: not sent again" if f["count"] else None
    ),
    "check.list_failed": lambda f: (
        f"could not read the {f['job_type']} job list ({_reason(f)}); reading each job instead"
    ),
    "worker.claimed": lambda f: f"took {f['jobs']} job(s) to work on ({f['taken_over']} from a stopped worker)",
    "worker.lost": lambda f: f"another worker holds {f['jobs']} of this worker's jobs now",
}


def _again(wait_s: float) -> str:
    return "again at once" if float(wait_s) < 0.1 else f"again in {float(wait_s):.1f} s"


def _files(count: int) -> str:
    return "1 file" if count == 1 else f"{count} files"


def _reason(fields: Fields) -> str:
    """The event's reason, without the address it came from or the file's name again (the
    sentence has it)."""
    text = _FROM_URL.sub("", str(fields.get("reason", "")))
    for name in (fields.get("file"), fields.get("what")):
        if name and text.startswith(f"{name}: "):
            text = text[len(name) + 2 :]
        elif name and text.startswith(f"{name} "):
            text = text[len(name) + 1 :]
    return text


def sentence(event: Event) -> str | None:
    """An event as a person reads it in the live view (None: nothing worth telling, e.g. no
    jobs adopted); the log keeps the `key=value` form."""
    tell = _SENTENCES.get(event.name)
    if tell is not None:
        try:
            return tell(event.fields)
        except (KeyError, ValueError, TypeError):
            pass  # an event whose fields changed: told plainly below
    words = event.name.replace(".", " ").replace("_", " ")
    shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in event.fields.items())
    return ": ".join(p for p in (words, shown) if p)


class _Events(logging.Handler):
    """The latest events of the run, as sentences, for the live view."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: deque[tuple[int, str]] = deque(maxlen=200)

    def emit(self, record: logging.LogRecord) -> None:
        event: Event | None = getattr(record, RECORD_ATTR, None)  # its fields scrubbed when it was made
        told = sentence(event) if event is not None else scrub(record.getMessage())
        if told is not None:
            self.records.append((record.levelno, told))


# -- speeds ---------------------------------------------------------------------------------


class _Rate:
    """Bytes a second over a window, from a counter that only grows and was 0 before `origin`.
    Every speed of the view is taken over the same window, so the files' speeds add up to
    the total (a file that started within the window counts 0 bytes before it started)."""

    def __init__(self, origin: float) -> None:
        self.samples: deque[tuple[float, int]] = deque([(origin, 0)])

    def update(self, now: float, count: int, since: float) -> float:
        """Bytes a second from `since` to `now`."""
        self.samples.append((now, count))
        while len(self.samples) > 1 and self.samples[1][0] <= since:
            self.samples.popleft()
        return (count - self.samples[0][1]) / (now - since) if now > since else 0.0


# -- the view ---------------------------------------------------------------------------------


class LiveView:
    def __init__(self, engine: Engine, console: Console) -> None:
        self.engine = engine
        self.console = console
        self.started = time.monotonic()
        self._events = _Events()
        self._total = _Rate(self.started)
        self._files: dict[str, _Rate] = {}
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
            try:
                await self.engine.refresh_snapshot()
            except Exception:  # a display never stops a run: the last snapshot stays
                log.debug("live.snapshot_failed", exc_info=True)
            self._live.update(self._render(), refresh=True)

    def _render(self) -> Group:
        snapshot = self.engine.snapshot
        head = Text.assemble(
            ("dreamlook-batch ", "bold"),
            (f"campaign {self.engine.manifest.campaign}", "cyan"),
            f"  {human_seconds(time.monotonic() - self.started)}  ",
            (f"(stopping: {snapshot.stopped_by})" if snapshot.stopped_by else "", "yellow"),
        )
        states = Text()
        for state in STATE_ORDER:
            if snapshot.counts.get(state):
                states.append(f"{state.value} {snapshot.counts[state]}  ", style=STATE_STYLE.get(state, ""))
        parts: list[Text | Table] = [head, states or Text("no jobs")]
        now = self.engine.now()
        if snapshot.jobs:
            parts.append(self._jobs(snapshot, now))
        if snapshot.counts:
            parts.append(Text(campaign_line(snapshot, now), no_wrap=False, overflow="fold"))
        if snapshot.transfers:
            parts.append(self._downloads(snapshot.transfers, snapshot.bytes_fetched))
        parts.append(self._recent())
        parts.append(Text(FOOTER, style="dim", no_wrap=False, overflow="fold"))
        return Group(*parts)

    def _jobs(self, snapshot: Snapshot, now: float) -> Table:
        jobs = sorted(snapshot.jobs, key=lambda j: (not j.running, j.ends_at or float("inf"), j.job_id))[:JOBS_SHOWN]
        rows = [(job.job_id, job.type, *job_cells(job, now)) for job in jobs]
        if len(snapshot.jobs) > JOBS_SHOWN:
            rows.append((f"... and {len(snapshot.jobs) - JOBS_SHOWN} more", "", "", "", "", ""))
        # A job id is never cut: on a narrow screen the type, then the bar, then the state give way.
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        shown = [0, 2, 3, 4, 5, 1]  # id, state, bar, %, end, type: the last is left out first
        for dropped in (1, 3, 2):
            if sum(widths[i] + 2 for i in shown) <= self.console.width:
                break
            shown.remove(dropped)
        shown.sort()
        table = Table(box=None, pad_edge=False, show_header=False, title="at the service", title_justify="left")
        for i in shown:
            # The id is never cut nor wrapped; the predicted end wraps rather than being cut.
            table.add_column(no_wrap=i not in (0, 5), overflow="fold", min_width=widths[i] if i == 0 else None)
        for row in rows:
            table.add_row(*(row[i] for i in shown))
        return table

    def _downloads(self, transfers: tuple[Transfer, ...], fetched: int) -> Table:
        now = time.monotonic()
        since = max(now - SPEED_WINDOW_S, self.started)
        rates = {t.name: self._rate_of(t, now, since) for t in transfers}
        for name in set(self._files) - set(rates):
            del self._files[name]
        total = self._total.update(now, fetched, since)
        table = Table(
            box=None,
            pad_edge=False,
            show_header=False,
            title=f"downloads: {len(rates)} file(s), {human_bytes(total)}/s",
            title_justify="left",
        )
        shown = sorted(transfers, key=lambda t: t.name)[:FILES_SHOWN]
        rows = [file_cells(t, rates[t.name]) for t in shown]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        room = self.console.width - sum(widths) - 2 * len(widths)  # a column is padded one cell each side
        table.add_column(overflow="fold")  # fitted to `room`; folded, never cut, on a screen too narrow
        for width in widths:
            table.add_column(no_wrap=True, justify="right", min_width=width)
        for t, row in zip(shown, rows, strict=True):
            table.add_row(fit_name(t.name, room), *row)
        if len(rates) > FILES_SHOWN:
            table.add_row(f"... and {len(rates) - FILES_SHOWN} more", "", "", "", "")
        return table

    def _rate_of(self, transfer: Transfer, now: float, since: float) -> float:
        rate = self._files.get(transfer.name)
        if rate is None:
            rate = self._files[transfer.name] = _Rate(transfer.started)
        return rate.update(now, transfer.received, since)

    def _recent(self) -> Text:
        records = list(self._events.records)
        bad = [m for level, m in records if level >= logging.WARNING][-EVENTS_SHOWN:]
        room = EVENTS_SHOWN - len(bad)
        rest = [m for level, m in records if level < logging.WARNING][-room:] if room else []
        events = Text(no_wrap=False, overflow="fold")  # wrapped, never cut: a file's name is told whole
        for message in bad:
            events.append(f"! {message}\n", style="red")
        for message in rest:
            events.append(f"  {message}\n")
        events.rstrip()
        return events


def job_cells(job: JobProgress, now: float) -> tuple[str, str, str, str]:
    """State, a progress bar, the percentage, and the predicted time left of one job at the service."""
    pct = job.percentage_at(now)
    cells = 0 if pct is None else int(BAR_CELLS * pct / 100)
    bar = "" if pct is None else "█" * cells + "░" * (BAR_CELLS - cells)
    shown = "" if pct is None else f"{pct:.0f}%"
    end = ends_in(job.ends_at, now)
    return "running" if job.running else "queued", bar, shown, end if job.ends_at is None else f"ends {end}"


def ends_in(ends_at: float | None, now: float) -> str:
    """When a predicted end comes, as `ends ...` completes it."""
    if ends_at is None:
        return "end not known yet"
    left = ends_at - now
    return f"in ~{human_seconds(left)}" if left >= 1 else "any moment now"


def campaign_line(snapshot: Snapshot, now: float) -> str:
    """How far the campaign is, and when the jobs at the service should end."""
    counts = snapshot.counts
    total = sum(counts.values())
    finished = sum(n for s, n in counts.items() if s.terminal)
    line = f"campaign: {finished} of {total} jobs finished"
    if snapshot.jobs:
        if snapshot.campaign_ends_at is not None:
            line += f"; the jobs at the service should end {ends_in(snapshot.campaign_ends_at, now)}"
        else:
            line += "; the end of the jobs at the service is not known yet"
    waiting = counts.get(JobState.PENDING, 0)
    if waiting:
        line += f"; {waiting} not submitted yet"
    return line


def fit_name(name: str, width: int) -> str:
    """`job/file` in `width` cells: the job id whole, the file's name cut in its middle (its
    end tells files apart: checkpoint id and extension)."""
    if len(name) <= width:
        return name
    job, _, file = name.rpartition("/")
    room = width - len(job) - 2  # the slash and the ellipsis
    if room < 8:
        return name  # no room to cut usefully: whole (folded)
    head = room // 3
    return f"{job}/{file[:head]}…{file[len(file) - (room - head) :]}"


def file_cells(transfer: Transfer, rate: float) -> tuple[str, str, str, str]:
    """Bytes on hand of the size, the share, the speed, and the time left of one file."""
    done, total = transfer.done, transfer.total
    size = f"{human_bytes(done)} / {human_bytes(total)}" if total else human_bytes(done)
    share = f"{100 * done / total:.0f}%" if total else ""
    left = human_seconds((total - done) / rate) if total and done < total and rate > 0 else ""
    return size, share, f"{human_bytes(rate)}/s", left
