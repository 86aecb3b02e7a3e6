"""Where a campaign's state lives, and how the commands open and hold it: a SQLite file
(the embedded default: one process at a time, held with `CampaignLock`) or a PostgreSQL
database that several processes on several hosts share (`--state postgresql://...` or
`DREAMLOOK_BATCH_STATE`): there each `run` is a worker that leases the jobs it works on
(store/pg_lease.py), and no lock is taken. The PostgreSQL store is an optional extra;
asking for it without psycopg installed says how to install it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CampaignLocked, StoreError, UsageError
from .manifest.load import Manifest
from .store import CampaignLock, SqliteStore, Store

if TYPE_CHECKING:
    from .store.postgres import PostgresStore

STATE_ENV = "DREAMLOOK_BATCH_STATE"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_database(value: str | None) -> bool:
    return value is not None and value.lower().startswith(POSTGRES_SCHEMES)


def given_state(value: str | None) -> str | None:
    """`--state` as typed, else `DREAMLOOK_BATCH_STATE`, else None (the default file)."""
    return value or os.environ.get(STATE_ENV) or None


@dataclass(frozen=True, slots=True)
class StateAt:
    """A campaign's state: `database` (a postgresql:// URL) if set, else the SQLite `file`."""

    campaign: str
    file: Path
    database: str | None = None

    def __str__(self) -> str:
        if self.database is None:
            return str(self.file)
        from .store.pg_base import safe_url  # only with the extra installed

        return f"{safe_url(self.database)} (campaign {self.campaign})"


def _postgres() -> type[PostgresStore]:
    try:
        from .store.postgres import PostgresStore
    except ImportError as exc:
        raise UsageError(
            "a postgresql:// state needs the PostgreSQL extra: pip install 'dreamlook-batch[postgres]'"
        ) from exc
    return PostgresStore


def refuse_empty(file: Path) -> None:
    """A state file of 0 bytes is refused, by every command. SQLite would take it as a new, empty
    state (and `run` would start the campaign afresh), but this tool never leaves one behind past
    its first instant (the file has its first page before anything is recorded): it was emptied
    or made by something else, and may stand for runs that paid for jobs. A person decides."""
    try:
        empty = file.stat().st_size == 0
    except OSError:
        return  # missing (a new campaign) or unreadable: opening it says so
    if empty:
        raise StoreError(
            f"{file} is empty (0 bytes): not a state file. If nothing has run for this campaign, remove it "
            "and run again. If runs did, their record is lost: remove it, and the next run looks for this "
            "campaign's jobs at the service by their tags before paying for any"
        )


async def open_store(at: StateAt, *, memory: bool = False, lease_s: float | None = None) -> Store:
    """Open (or create) the state for a run; `memory`: a throwaway SQLite store (a dry run).
    In a database, this process is a worker whose leases last `lease_s`."""
    if memory:
        return await SqliteStore.open(Path(":memory:"))
    if at.database is not None:
        from .store.pg_lease import LEASE_S, Worker

        return await _postgres().open(
            at.database, at.campaign, worker=Worker.this_process(), lease_s=lease_s or LEASE_S
        )
    refuse_empty(at.file)
    return await SqliteStore.open(at.file)


async def open_existing(at: StateAt) -> Store | None:
    """The state if this campaign has one already, else None (nothing is created)."""
    if at.database is None:
        refuse_empty(at.file)
        return await SqliteStore.open(at.file) if at.file.exists() else None
    store = await _postgres().open(at.database, at.campaign)
    if await store.known():
        return store
    await store.close()
    return None


async def joined_manifest(campaign: str, state: str | None) -> Manifest:
    """`--campaign NAME` without a manifest: the jobs an earlier `run MANIFEST` loaded into the
    database, as that manifest last gave them."""
    if state is None or not is_database(state):
        raise UsageError(
            f"--campaign {campaign!r} without a manifest joins a campaign kept in PostgreSQL: "
            f"give --state postgresql://... (or set {STATE_ENV}), or the MANIFEST"
        )
    at = StateAt(campaign, Path(), state)
    store = await _postgres().open(state, campaign)
    try:
        specs = await store.specs()
    finally:
        await store.close()
    if not specs:
        raise StoreError(
            f"no campaign {campaign!r} in {at}: load it first with `dreamlook-batch run MANIFEST --state ...`"
        )
    return Manifest(Path.cwd(), campaign, tuple(specs), (), origin=str(at))


@contextlib.asynccontextmanager
async def held(at: StateAt) -> AsyncIterator[None]:
    """One process at a time drives a SQLite campaign (CampaignLocked otherwise, exit 4). A
    campaign in a database takes every worker that comes: leases share its jobs out."""
    if at.database is None:
        with CampaignLock(at.file):
            yield
        return
    yield


__all__ = ["STATE_ENV", "CampaignLocked", "StateAt", "given_state", "held", "joined_manifest", "open_existing"]
