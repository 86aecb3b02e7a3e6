"""Logging set-up for the CLI: plain lines for people, JSON lines for cron, nothing secret.

Modules log `event key=value ...` through `logging.getLogger(__name__)`; the first
word is the stable event name. A filter removes what must never be printed: API
keys, URL queries (signatures) and callback secrets, whatever the format.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_KEY = re.compile(r"dl-[0-9a-fA-F]{8,}")
_URL_QUERY = re.compile(r"(https?://[^\s?\"'<>]+)\?[^\s\"'<>]*")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_PAIR = re.compile(r"(\w+)=(\S+)")


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
        message = record.getMessage()
        event, _, rest = message.partition(" ")
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": event,
            "logger": record.name,
        }
        out.update(dict(_PAIR.findall(rest)))
        if not _PAIR.search(rest) and rest:
            out["message"] = rest
        if record.exc_info:
            out["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out)


def configure(log_format: str, verbosity: int) -> None:
    level = max(logging.DEBUG, min(logging.CRITICAL, logging.WARNING - 10 * verbosity))
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.addFilter(ScrubFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        logging.Formatter.converter = time.localtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def redact_json(obj: object) -> object:
    """JSON from the API, fit to print: URL signatures removed."""
    from .transfer.urls import redact_tree

    return redact_tree(obj)
