"""The state store: the single source of truth of a campaign. The only place with SQL.

`Store` (base.py) is the protocol everything above the store is typed against: domain
verbs, all awaitable, no SQL. `SqliteStore` (threaded.py) implements it over `SqliteDb`
(sqlite.py: the SQL) for one process per campaign; `CampaignLock` keeps it that way.
`PostgresStore` (postgres.py, pg_write.py on pg_base.py) implements it over a database
that several hosts share (the optional extra `postgres`: import it from its module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Claims, FileRow, JobRow, Store, SyncReport, UploadedPart, UploadRecord, WorkerRow
from .lock import CampaignLock
from .schema import SCHEMA_VERSION
from .sqlite import SqliteDb
from .threaded import SqliteStore


def _conforms(store: SqliteStore) -> Store:
    return store  # mypy checks here that SqliteStore is a Store, verb for verb


if TYPE_CHECKING:
    from .postgres import PostgresStore

    def _conforms_too(store: PostgresStore) -> Store:
        return store  # and PostgresStore


__all__ = [
    "SCHEMA_VERSION",
    "CampaignLock",
    "Claims",
    "FileRow",
    "JobRow",
    "SqliteDb",
    "SqliteStore",
    "Store",
    "SyncReport",
    "UploadRecord",
    "UploadedPart",
    "WorkerRow",
]
