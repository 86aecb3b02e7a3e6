"""What a file in flight has reached, for progress displays (the live view, `Snapshot`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Transfer:
    """One file being fetched: `done` bytes of it are on hand (what earlier attempts proved
    and what arrived since; never more than `total`, fewer again after a start-over), and
    `received` bytes came over the network since `started` (what speeds are made of)."""

    name: str
    total: int | None
    started: float = field(default_factory=time.monotonic)
    held: int = 0
    received: int = 0

    @property
    def done(self) -> int:
        return self.held if self.total is None else min(self.held, self.total)

    def start_at(self, offset: int) -> None:
        """An attempt starts with `offset` bytes on hand (a resume), or 0 (a start-over)."""
        self.held = offset

    def add(self, count: int) -> None:
        """`count` new bytes arrived and are on hand."""
        self.held += count
        self.received += count

    def drop(self, count: int) -> None:
        """`count` bytes counted as on hand were lost with a broken range (they come again)."""
        self.held -= count
