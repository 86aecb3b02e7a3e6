"""What a person sees after a run and between runs: the end-of-run summary, the status
table and the workers table (the live view of a run: live.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .logs import scrub
from .models import BAD_ENDINGS, JobState
from .output import NOT_IN_MANIFEST
from .run.outcome import StopReason
from .store import FileRow, JobRow, WorkerRow

if TYPE_CHECKING:
    from .commands import RunResult

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


def print_summary(
    console: Console, result: RunResult, *, dry_run: bool, once: bool, elapsed_s: float, campaign: str
) -> None:
    """What happened, what is where, and what to do next. `campaign`: the arguments that name
    this campaign to the other commands, as the user gave them (`jobs/x.yaml --simulate`)."""
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
            f"paid for, so still followed and fetched; `dreamlook-batch status {campaign}` lists them"
        )
    if result.files_done:
        console.print(f"files: {result.files_done} ({human_bytes(result.bytes_done)}) in {result.paths.out_shown}")
    if result.sim_url is not None:
        console.print(
            f"a rehearsal against the simulator; its state is {result.paths.at}. Look at it with "
            f"`dreamlook-batch status {campaign}` and `dreamlook-batch report {campaign}`"
        )
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
            f"`dreamlook-batch status {campaign}` lists the other remote ids"
        )
    if counts.get(JobState.UNKNOWN) or outcome.removed.get(JobState.UNKNOWN):
        console.print(
            f"unknown jobs: check your dreamlook.ai jobs page, then `dreamlook-batch settle {campaign} JOB ...`"
        )
    if any(counts.get(s) for s in BAD_ENDINGS):
        console.print(
            f"`dreamlook-batch status {campaign}` lists every job with its reason; "
            f"`dreamlook-batch report {campaign}` writes a page to review"
        )


def _tally(counts: dict[JobState, int]) -> str:
    return ", ".join(f"{counts[s]} {s.value}" for s in STATE_ORDER if counts.get(s))


STATUS_COLUMNS = ("job", "state", "reason", "files", "remote id", "type", "age")  # the first given way last
REASON_MIN_CELLS = 16  # a reason narrower than this is left out rather than shown one word a line


def status_table(rows: Sequence[JobRow], files: dict[str, list[FileRow]], now: float, width: int = 80) -> Table:
    """Every job of the campaign in `width` cells. A job id is never cut (two long ids that
    differ at the end must not look the same): on a narrow screen the other columns give
    way first, the least needed left out (age, type, remote id, files, then the reason)."""
    cells: list[dict[str, str | Text]] = []
    totals: dict[str, int] = {}
    removed: dict[JobState, int] = {}  # counted apart
    for r in rows:
        fs = files.get(r.id, [])
        cells.append(
            {
                "job": r.id,
                "state": Text(r.state.value, style=STATE_STYLE.get(r.state, "")),
                "reason": scrub(job_note(r, now)),
                "files": f"{sum(f.done for f in fs)}/{len(fs)}" if fs else "",
                "remote id": r.remote_id or "",
                "type": r.type,
                "age": human_seconds(now - r.submitted_at) if r.submitted_at else "",
            }
        )
        if r.in_manifest:
            totals[r.state.value] = totals.get(r.state.value, 0) + 1
        else:
            removed[r.state] = removed.get(r.state, 0) + 1
    natural = {name: max([len(name), *(len(str(row[name])) for row in cells)]) for name in STATUS_COLUMNS}
    natural["reason"] = min(natural["reason"], REASON_MIN_CELLS)  # it wraps: this much is enough
    shown = [name for name in STATUS_COLUMNS if name == "job" or name == "state" or any(row[name] for row in cells)]
    # A bordered table takes 3 cells a column and one more: leave out what does not fit.
    while len(shown) > 2 and sum(natural[n] for n in shown) + 3 * len(shown) + 1 > width:
        shown.pop()
    table = Table(title_justify="left")
    for name in shown:
        if name in ("job", "remote id"):
            table.add_column(name, no_wrap=True, overflow="fold", min_width=natural[name])
        elif name == "reason":
            table.add_column(name, overflow="fold", min_width=min(natural[name], REASON_MIN_CELLS))
        else:
            table.add_column(name, no_wrap=True, min_width=natural[name])
    for row in cells:
        table.add_row(*(row[name] for name in shown))
    duplicates = sum(1 for r in rows if r.duplicate_ids)
    caption = f"{sum(totals.values())} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(totals.items()))
    if removed:
        caption += f"; {sum(removed.values())} {NOT_IN_MANIFEST} ({_tally(removed)})"
    if duplicates:
        caption += f"; {duplicates} paid twice (duplicate)"
    left_out = [n for n in STATUS_COLUMNS if n not in shown and any(row[n] for row in cells)]
    if left_out:
        caption += f"; too narrow for {', '.join(left_out)} (`status --json` has every field)"
    table.caption, table.caption_justify = Text(caption, no_wrap=False, overflow="fold"), "left"
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
