"""V4-style signed storage URLs: what GCS puts in the query, with an HMAC signature.

The signature covers the path, X-Goog-Date and X-Goog-Expires, so a client that
edits any of them gets 403 SignatureDoesNotMatch, and one that waits too long
gets 400 ExpiredToken, as real storage answers.
"""

from __future__ import annotations

import enum
import hmac
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from hashlib import sha256
from urllib.parse import urlencode

DATE_FORMAT = "%Y%m%dT%H%M%SZ"
CREDENTIAL = "174139095815-compute%40developer.gserviceaccount.com"


class Verdict(enum.Enum):
    VALID = "valid"
    EXPIRED = "expired"
    BAD_SIGNATURE = "bad-signature"


def _mac(secret: bytes, path: str, date: str, expires: str) -> str:
    return hmac.new(secret, f"{path}\n{date}\n{expires}".encode(), sha256).hexdigest()


def sign(secret: bytes, path: str, now: float, ttl_s: float) -> str:
    """The query string for `path`, valid from `now` for `ttl_s` real seconds."""
    stamp = datetime.fromtimestamp(math.floor(now), UTC)
    date = stamp.strftime(DATE_FORMAT)
    expires = str(max(1, math.ceil(ttl_s)))
    query = {
        "X-Goog-Algorithm": "GOOG4-HMAC-SHA256",
        "X-Goog-Credential": f"{CREDENTIAL}/{stamp:%Y%m%d}/auto/storage/goog4_request",
        "X-Goog-Date": date,
        "X-Goog-Expires": expires,
        "X-Goog-SignedHeaders": "host",
        "X-Goog-Signature": _mac(secret, path, date, expires),
    }
    return urlencode(query, safe="%/")


def verify(secret: bytes, path: str, query: Mapping[str, str], now: float) -> Verdict:
    date, expires = query.get("X-Goog-Date", ""), query.get("X-Goog-Expires", "")
    given = query.get("X-Goog-Signature", "")
    if not hmac.compare_digest(given, _mac(secret, path, date, expires)):
        return Verdict.BAD_SIGNATURE
    try:
        start = datetime.strptime(date, DATE_FORMAT).replace(tzinfo=UTC).timestamp()
        if now >= start + int(expires):
            return Verdict.EXPIRED
    except ValueError:
        return Verdict.BAD_SIGNATURE
    return Verdict.VALID
