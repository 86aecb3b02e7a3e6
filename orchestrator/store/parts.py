"""What a partial download has proven: the object it belongs to and the byte spans on disk.

A span is recorded only after its bytes were written and synced, so after any crash
the record names bytes that really are in the `.part`. The record is plain offsets and
lengths, never an index of some range size: a resume with other settings (`--range-mb`,
`--parallel-min-mb`, `--connections-per-file`, one stream or ranges) reuses exactly these
bytes and fetches only the gaps. Bytes outside every span are never trusted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

Span = tuple[int, int]  # (offset, length)


@dataclass(frozen=True, slots=True, kw_only=True)
class PartRecord:
    """The object a `.part` was fetched from (size, ETag) and the spans proven on disk."""

    size: int | None
    etag: str | None
    spans: tuple[Span, ...]

    def covered(self) -> list[tuple[int, int]]:
        """The proven bytes as sorted, disjoint [start, end) intervals."""
        return merged(self.spans)

    def prefix(self) -> int:
        """How many bytes from offset 0 on are proven without a gap."""
        intervals = self.covered()
        return intervals[0][1] if intervals and intervals[0][0] == 0 else 0

    def proven_bytes(self) -> int:
        return sum(end - start for start, end in self.covered())


class PartLog(Protocol):
    """A partial download's memory across restarts (the state store keeps it)."""

    suffix: str  # of the partial file's name: `.part`, or `.<lease epoch>.part` in a shared campaign

    async def record(self) -> PartRecord | None: ...
    async def start_over(self, size: int | None) -> None: ...  # forget every span and the ETag
    async def set_etag(self, etag: str | None) -> None: ...
    async def prove(self, offset: int, length: int) -> None: ...  # only after the bytes are synced
    async def keep_only(self, spans: Iterable[Span]) -> None: ...  # forget every other span


class MemoryPartLog:
    """A `PartLog` that lives as long as the process: for one-off downloads (benchmarks)."""

    def __init__(self) -> None:
        self.suffix = ".part"
        self._size: int | None = None
        self._etag: str | None = None
        self._spans: dict[int, int] = {}
        self._known = False

    async def record(self) -> PartRecord | None:
        if not self._known:
            return None
        return PartRecord(size=self._size, etag=self._etag, spans=tuple(sorted(self._spans.items())))

    async def start_over(self, size: int | None) -> None:
        self._known, self._size, self._etag, self._spans = True, size, None, {}

    async def set_etag(self, etag: str | None) -> None:
        self._etag = etag

    async def prove(self, offset: int, length: int) -> None:
        self._spans[offset] = max(length, self._spans.get(offset, 0))

    async def keep_only(self, spans: Iterable[Span]) -> None:
        self._spans = dict(spans)


def merged(spans: Iterable[Span]) -> list[tuple[int, int]]:
    """Spans as sorted, disjoint [start, end) intervals (overlapping and touching ones joined)."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(spans):
        if length <= 0:
            continue
        end = offset + length
        if out and offset <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((offset, end))
    return out


def gaps(covered: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The [start, end) intervals of [0, size) that `covered` (sorted, disjoint) leaves out."""
    out: list[tuple[int, int]] = []
    pos = 0
    for start, end in covered:
        if start > pos:
            out.append((pos, min(start, size)))
        pos = max(pos, end)
    if pos < size:
        out.append((pos, size))
    return [(s, e) for s, e in out if e > s]


def split(intervals: Iterable[tuple[int, int]], piece_bytes: int) -> list[tuple[int, int]]:
    """Each interval cut into pieces of at most `piece_bytes`."""
    out: list[tuple[int, int]] = []
    for start, end in intervals:
        out.extend((s, min(end, s + piece_bytes)) for s in range(start, end, piece_bytes))
    return out
