"""The events a run tells: their names, fields, levels and meanings (the one list), and `event()`,
the only way modules emit one.

An event is a log record with its fields kept as typed values (`extra=`): plain logs show
`name key=value ...` (a value with spaces quoted), JSON logs carry the values with their types,
and the Python API's event stream carries the same `Event`. The README's table of events is
this list (`markdown_table`, checked by a test), and a test checks every line of a faulty run's
JSON log against it (`check_json`). Every value is scrubbed when the event is made: a secret
never reaches a record, whatever reads it.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .logs import NOT_AN_EVENT, RECORD_ATTR, scrub

# Fields of every JSON line, whatever the event.
BASE_FIELDS: Mapping[str, type | tuple[type, ...]] = MappingProxyType(
    {"ts": (int, float), "level": str, "event": str, "logger": str, "message": str}
)
ERROR_FIELD = "error"  # a traceback, scrubbed: present when the event carries one


# Every field has one type, whatever the event: a log shipper maps each name once.
FIELD_TYPES: Mapping[str, type] = MappingProxyType(
    {
        "job_id": str,  # the job's id in the manifest
        "state": str,  # the job's state in the store (models.JobState)
        "reason": str,  # why, in words
        "remote_id": str,  # the service's id of the job
        "remote_state": str,  # the job's state as the service says it
        "files": int,
        "file": str,
        "bytes": int,
        "verdict": str,
        "check_after": str,  # a local time
        "until": str,  # a local time
        "duplicate_ids": list,
        "what": str,
        "attempt": int,
        "wait_s": float,
        "asked_s": float,
        "used_s": float,
        "job_type": str,
        "key": str,
        "url": str,
        "peer": str,
        "count": int,
        "checked": int,
        "jobs": int,
        "taken_over": int,
        "by": str,  # what told the run to stop: SIGINT, SIGTERM, stop()
        "grace_s": float,
        "exit_code": int,
        "stopped_by": str,
        "files_done": int,
        "problems": int,
        "counts": dict,
        "verbs": int,
        "line": int,  # a line of a manifest or rows file
        "errors": int,
        "commits": int,
        "synced": int,
        "changes": int,
    }
)


@dataclass(frozen=True, slots=True)
class EventSpec:
    name: str
    level: int
    meaning: str
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    note: str = ""  # said after the fields in plain logs (what happens next)


def _spec(name: str, level: int, meaning: str, required: str = "", optional: str = "", note: str = "") -> EventSpec:
    return EventSpec(name, level, meaning, tuple(required.split()), tuple(optional.split()), note)


INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR
_JOB = "job_id state"  # what a person needs to act on a job event (with its remote_id where there is one)
_RETRY = "what attempt wait_s reason"

# fmt: off
EVENTS: Mapping[str, EventSpec] = MappingProxyType({s.name: s for s in (
    # -- the manifest (with --log-format json; the text format prints them as they are)
    _spec("manifest.warning", WARNING, "a manifest value that is legal but probably not meant", "file reason",
          "line job_id"),
    _spec("manifest.error", ERROR, "a manifest mistake: nothing is sent (exit 2)", "file reason", "line job_id"),
    _spec("manifest.rejected", ERROR, "the manifest has errors: nothing was sent; fix them and run again", "errors",
          note="nothing was sent"),
    # -- jobs
    _spec("job.submitted", INFO, "the service accepted the job (it is paid for)", f"{_JOB} remote_id"),
    _spec("job.not_sent", INFO, "a job was not sent this time; nothing was created", f"{_JOB} reason"),
    _spec("job.submit_unclear", WARNING, "the answer to a submission was lost: the job is looked for by its tag "
          "after a grace window", f"{_JOB} reason check_after"),
    _spec("job.reconcile_waiting", INFO, "a lost submission waits out its grace window", f"{_JOB} until"),
    _spec("job.reconciled", INFO, "a lost submission was looked for: found, absent (sent again), unread or unknown",
          f"{_JOB} verdict reason", "remote_id"),
    _spec("job.adopted", INFO, "a job the service holds under our tag was taken as this job", f"{_JOB} remote_id"),
    _spec("job.duplicate", ERROR, "the service holds two jobs with this job's tag: one is kept, the others reported",
          f"{_JOB} remote_id duplicate_ids"),
    _spec("job.check_failed", WARNING, "reading a job's state failed; it is checked again later",
          f"{_JOB} reason", "remote_id"),
    _spec("job.unknown_state", WARNING, "the service reports a state this tool does not know; it keeps waiting",
          f"{_JOB} remote_id remote_state", note="still waiting"),
    _spec("job.succeeded", INFO, "the job finished at the service; its chosen files are to download",
          f"{_JOB} remote_id files"),
    _spec("job.done", INFO, "every chosen file of the job is on disk (or in the bucket) and verified",
          f"{_JOB} files", "remote_id"),
    _spec("job.problem", WARNING, "something a person should know about a job (told once per job and reason)",
          f"{_JOB} reason", "remote_id"),
    _spec("job.problem_again", INFO, "a problem already told, found again", f"{_JOB} reason", "remote_id"),
    _spec("job.taken_over", WARNING, "another worker holds the job now (this worker's lease ran out)", "job_id",
          note="this worker lets it go"),
    _spec("job.answer_after_takeover", WARNING, "a submission's answer came after another worker took the job "
          "over; that worker finds it by its tag", "job_id",
          note="another worker holds it now and finds the job by its tag after its grace window"),
    # -- files
    _spec("file.done", INFO, "a result file is complete, verified and in place", "job_id file bytes"),
    _spec("job.files_restored", WARNING, "a finished job's job.json or SHA256SUMS was missing or stale at the start "
          "of a run: written again from the state store (no API call, no download)", "job_id",
          note="job.json and SHA256SUMS written again"),
    _spec("file.missing", WARNING, "a file recorded as done is not at its destination: it is fetched again",
          "job_id file", note="fetching it again"),
    _spec("file.requeued", WARNING, "a download failed and is tried again later in this run", "job_id file reason"),
    _spec("download.url_renewed", INFO, "a file's signed URL was renewed by reading its job", "file", "job_id"),
    _spec("download.ranges_ignored", INFO, "storage ignored Range: the file comes in one stream", "file",
          "job_id", note="one stream instead"),
    _spec("download.object_changed", WARNING, "the file changed at storage mid-download: it starts over",
          "file reason", "job_id", note="starting over"),
    _spec("download.retry", INFO, "a download is tried again after a wait", _RETRY, "job_id"),
    _spec("download.range_retry", INFO, "a range is asked again after a wait", _RETRY, "job_id"),
    _spec("upload.already_there", INFO, "the bucket already holds this file's key with the same bytes", "key",
          "job_id"),
    _spec("upload.abort_failed", WARNING, "the bucket refused to abort an upload; it stays on record", "key reason",
          "job_id"),
    # -- the API, the store (`job_id`: when it was for one job's files)
    _spec("api.retry", INFO, "an API call is tried again after a wait", _RETRY, "job_id"),
    _spec("store.retry", INFO, "a state store write conflicted and is tried again", _RETRY, "job_id"),
    _spec("store.batch_failed", WARNING, "a batch of state store changes failed as a whole: each runs again on "
          "its own", "verbs reason", note="running them one by one"),
    _spec("store.commits", INFO, "what the state store committed in this run (with -v)", "commits synced changes"),
    _spec("api.retry_after_capped", WARNING, "the service asked for a longer pause than the cap: the cap is used",
          "asked_s used_s"),
    _spec("check.list_failed", INFO, "a job listing failed: jobs are read one by one instead", "job_type reason",
          note="one GET per job instead"),
    # -- callbacks
    _spec("callback.listening", INFO, "the callback receiver is up", "url"),
    _spec("callback.accepted", INFO, "a callback from the service was taken as a hint to check the job",
          "job_id remote_state"),
    _spec("callback.rejected", WARNING, "a callback was refused (bad secret, malformed, unknown job, stale)",
          "reason", "peer"),
    _spec("callback.error", ERROR, "a callback could not be handled (the run goes on); `error` has the traceback"),
    # -- the campaign, workers, the run
    _spec("campaign.adopted", INFO, "jobs found at the service under our tags were adopted", "count checked"),
    _spec("campaign.adoption_limited", WARNING, "adoption could not look at every job", "reason"),
    _spec("campaign.duplicate_scan_failed", INFO, "a listing read to find duplicates failed; a later run reads it",
          "job_type reason"),
    _spec("worker.claimed", INFO, "this worker took jobs of a shared campaign", "jobs taken_over"),
    _spec("worker.lost", WARNING, "another worker holds jobs this one had", "jobs",
          note="another worker holds them now"),
    _spec("run.stopping", WARNING, "told to stop (a first Ctrl-C or SIGTERM): nothing new starts; what is in "
          "flight is finished for up to `grace_s` seconds", "by grace_s",
          note="finishing the files in flight (up to {grace_s:g} s); press Ctrl-C again to stop now"),
    _spec("run.stopping_now", WARNING, "told to stop a second time: the run stops at once, state saved", "by",
          note="stopping now; the state is saved"),
    _spec("run.finished", INFO, "the run ended: why it stopped (`none`: it finished), its exit code, the jobs by "
          "state", "exit_code stopped_by files_done problems counts"),
)})
# fmt: on


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its name, level, and fields with their types (secrets scrubbed)."""

    name: str
    level: int
    fields: Mapping[str, Any]
    ts: float  # Unix time

    @property
    def spec(self) -> EventSpec:
        return EVENTS[self.name]

    def text(self) -> str:
        """`name key=value ...` as plain logs show it (a value with spaces is quoted)."""
        parts = [self.name, *(f"{k}={_plain(v)}" for k, v in self.fields.items())]
        line = " ".join(parts)
        return f"{line}: {self.spec.note.format(**self.fields)}" if self.spec.note else line

    def to_json(self) -> dict[str, Any]:
        return {"event": self.name, **self.fields}


def _plain(value: Any) -> str:
    if isinstance(value, list):
        value = ",".join(map(str, value))
    elif isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _clean(value: Any) -> Any:
    """A value fit for a record: enums by value, strings scrubbed, errors as text."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [scrub(str(_clean(v))) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    return scrub(str(value))


# The job whose files are being fetched: events of the transfer layer (which knows files, not
# jobs) name it. Set around one file's work; the tasks it starts inherit it.
_about: contextvars.ContextVar[str | None] = contextvars.ContextVar("dreamlook_event_job", default=None)


@contextlib.contextmanager
def about_job(job_id: str) -> Iterator[None]:
    token = _about.set(job_id)
    try:
        yield
    finally:
        _about.reset(token)


# The listener of the run this task belongs to (the Python API's event stream). A context
# variable: tasks a run starts inherit it, so two runs in one process each hear their own.
listener: contextvars.ContextVar[Callable[[Event], None] | None] = contextvars.ContextVar(
    "dreamlook_event_listener", default=None
)


def event(log: logging.Logger, name: str, *, exc_info: bool = False, **fields: Any) -> None:
    """Emit event `name` on `log` at its level, and to the run's listener whatever the log level;
    a field given as None is left out."""
    spec = EVENTS[name]  # an unknown name is a bug: it fails at once, in every test that reaches it
    hear = listener.get()
    if hear is None and not log.isEnabledFor(spec.level):
        return
    job_id = _about.get()
    if job_id is not None and "job_id" not in fields and "job_id" in spec.optional:
        fields = {"job_id": job_id, **fields}
    ev = Event(name, spec.level, {k: _clean(v) for k, v in fields.items() if v is not None}, time.time())
    if hear is not None:
        hear(ev)
    log.log(spec.level, "%s", ev.text(), exc_info=exc_info, extra={RECORD_ATTR: ev}, stacklevel=2)


# -- the contract: what a JSON line must be --------------------------------------------


def _type_ok(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)
    if isinstance(value, bool):
        return bool in kinds
    if list in kinds and isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    return isinstance(value, kinds)


def check_json(line: Mapping[str, Any]) -> list[str]:
    """What is wrong with one parsed JSON log line, against the list of events ([] when right)."""
    wrong = [f"{k}: missing or not {kinds}" for k, kinds in BASE_FIELDS.items() if not _type_ok(line.get(k), kinds)]
    name = line.get("event")
    rest = {k: v for k, v in line.items() if k not in BASE_FIELDS and k != ERROR_FIELD}
    if name == NOT_AN_EVENT:
        logger = str(line.get("logger", ""))
        if logger.startswith("orchestrator") and not logger.startswith("orchestrator.sim"):
            wrong.append(f"{logger} logged a line that is no event: {line.get('message')}")
        return wrong + [f"{k}: a line that is no event has no fields" for k in rest]
    spec = EVENTS.get(str(name))
    if spec is None:
        return [*wrong, f"{name}: not an event of the list"]
    wrong += [f"{name}: {key} missing" for key in spec.required if key not in rest]
    for key, value in rest.items():
        if key not in spec.required and key not in spec.optional:
            wrong.append(f"{name}: {key} is not a field of this event")
        elif not _type_ok(value, FIELD_TYPES[key]):
            wrong.append(f"{name}: {key}={value!r} is not {_TYPE_NAMES[FIELD_TYPES[key]]}")
    level = logging.getLevelName(spec.level).lower()
    if line.get("level") != level:
        wrong.append(f"{name}: level {line.get('level')}, not {level}")
    return wrong


_TYPE_NAMES = {str: "text", int: "integer", float: "number", list: "list of text", dict: "object", bool: "true/false"}


def markdown_table() -> str:
    """The README's table of events: generated from this list (a test keeps them equal)."""
    rows = ["| event | level | fields (*optional*) | meaning |", "|---|---|---|---|"]
    for spec in EVENTS.values():
        fields = [f"`{k}`" for k in spec.required] + [f"*`{k}`*" for k in spec.optional]
        level = logging.getLevelName(spec.level).lower()
        rows.append(f"| `{spec.name}` | {level} | {' '.join(fields) or '-'} | {spec.meaning} |")
    return "\n".join(rows) + "\n"


def fields_table() -> str:
    """The README's table of fields: each name has one type, whatever the event."""
    rows = ["| field | type |", "|---|---|"]
    rows += [f"| `{k}` | {_TYPE_NAMES[t]} |" for k, t in FIELD_TYPES.items()]
    return "\n".join(rows) + "\n"
