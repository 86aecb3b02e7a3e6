"""Logging set-up for the CLI: plain lines for people, JSON lines for cron, nothing secret.

Modules emit events through `events.event(log, name, **fields)` on `logging.getLogger(__name__)`:
the record keeps the typed fields, plain logs show `name key=value ...`, and JSON lines carry
`ts`, `level`, `event`, `logger`, `message` and the event's fields with their types. A line that
is no event (a library's) is `"event": "log"`. A filter removes what must never be printed: API
keys, URL queries (signatures) and callback secrets, whatever the format.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_KEY = re.compile(r"dl-[0-9a-fA-F]{8,}")
_URL_QUERY = re.compile(r"(https?://[^\s?\"'<>]+)\?(?!<redacted>)[^\s\"'<>]*")  # once: scrub twice, same text
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")

RECORD_ATTR = "dreamlook_event"  # where a LogRecord keeps its `events.Event`
NOT_AN_EVENT = "log"  # how JSON names a line that is no event (a library's message)


def scrub(text: str) -> str:
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    text = _BEARER.sub(r"\1<redacted>", text)
    return _KEY.sub("dl-<redacted>", text)


class ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: Any = getattr(record, RECORD_ATTR, None)  # fields scrubbed when the event was made
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": event.name if event is not None else NOT_AN_EVENT,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        if event is not None:
            out.update(event.fields)
        if record.exc_info:
            out["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out)


_json = False  # stderr carries JSON lines only (`--log-format json`)


def is_json() -> bool:
    """Whether stderr is a JSON log: what the CLI says there must then be events too."""
    return _json


def configure(log_format: str, verbosity: int) -> None:
    level = max(logging.DEBUG, min(logging.CRITICAL, logging.WARNING - 10 * verbosity))
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.addFilter(ScrubFilter())
    global _json
    _json = log_format == "json"
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        logging.Formatter.converter = time.localtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def shows(level: int) -> bool:
    """Whether the log on stderr shows records of `level` (the CLI says some things itself when not)."""
    return any(h.level <= level for h in logging.getLogger().handlers) and logging.getLogger().isEnabledFor(level)


def redact_json(obj: object) -> object:
    """JSON from the API, fit to print: URL signatures removed."""
    from .transfer.urls import redact_tree

    return redact_tree(obj)
