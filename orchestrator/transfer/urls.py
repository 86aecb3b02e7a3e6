"""Signed result URLs: when they die, and how to show them without their secrets."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

_SIGNED_DATE = "%Y%m%dT%H%M%SZ"
_SECRET_KEYS = re.compile(r"(signature|credential|token|key|secret)", re.IGNORECASE)


def expires_at(url: str) -> float | None:
    """Unix time the URL dies: GCS V4 (X-Goog-*), S3 V4 (X-Amz-*) or plain `Expires`."""
    query = {k.lower(): v[0] for k, v in parse_qs(urlsplit(url).query).items() if v}
    for prefix in ("x-goog-", "x-amz-"):
        date, ttl = query.get(prefix + "date"), query.get(prefix + "expires")
        if date and ttl:
            try:
                start = datetime.strptime(date, _SIGNED_DATE).replace(tzinfo=UTC).timestamp()
                return start + int(ttl)
            except ValueError:
                return None
    plain = query.get("expires")
    if plain and plain.isdigit():
        return float(plain)
    return None


def redact(url: str) -> str:
    """The URL without its query (where signatures live) and without user info."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_tree(obj: Any) -> Any:
    """A copy of a JSON tree with every URL's query removed and secret-named values hidden."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(v, str) and _SECRET_KEYS.search(str(k)) and k not in ("checkpoint_id",):
                out[k] = "<redacted>"
            else:
                out[k] = redact_tree(v)
        return out
    if isinstance(obj, list):
        return [redact_tree(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(("http://", "https://")) and "?" in obj:
        return redact(obj)
    return obj
