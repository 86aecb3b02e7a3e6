"""What storage's answers say, read once for both download paths (one stream, ranges):
its status as an error, its `Content-Range`, and its hashes of the whole object.

A 400, 401 or 403 is a signed URL that expired or was refused (renew it); a 404 or 410
a file the service deleted (the job is lost); anything else but 200 and 206 is worth
another attempt. What a 200 or a 416 means depends on what was asked: the callers say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp

from ..errors import DownloadError, FileGone, UrlExpired
from .verify import StorageHashes

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
EXPIRED = frozenset({400, 401, 403})
GONE = frozenset({404, 410})
BODIES = frozenset({200, 206})  # the only answers whose body is ever written


@dataclass(frozen=True, slots=True)
class ContentRange:
    first: int
    end: int  # exclusive
    total: int | None  # None: storage did not say (`*`)


async def raise_for_status(resp: aiohttp.ClientResponse, what: str) -> None:
    """Nothing for a body (200, 206); otherwise the error the status means."""
    if resp.status in BODIES:
        return
    if resp.status in EXPIRED:
        raise UrlExpired(f"{what}: storage answered {resp.status} ({_xml_code(await resp.text())})")
    if resp.status in GONE:
        raise FileGone(f"{what}: storage no longer has it")
    raise DownloadError(f"{what}: storage answered HTTP {resp.status}")


def content_range(resp: aiohttp.ClientResponse) -> ContentRange | None:
    match = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if not match:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return ContentRange(int(match.group(1)), int(match.group(2)) + 1, total)


def storage_hashes(resp: aiohttp.ClientResponse) -> StorageHashes:
    """Storage's hashes of the whole object, from its `x-goog-hash` headers (`crc32c=...,md5=...`,
    in one header or several)."""
    found: dict[str, str] = {}
    for header in resp.headers.getall("x-goog-hash", []):
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            if name in ("md5", "crc32c") and value:
                found.setdefault(name, value)
    return StorageHashes(md5=found.get("md5"), crc32c=found.get("crc32c"))


def _xml_code(body: str) -> str:
    match = re.search(r"<Code>([^<]+)</Code>", body)
    return match.group(1) if match else "no error code"
