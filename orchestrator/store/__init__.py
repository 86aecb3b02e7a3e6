"""The state store: the single source of truth of a campaign. The only place with SQL.

`Store` is the protocol the engine uses (domain verbs, no SQL); `SqliteStore` is the
implementation for one process per campaign; `CampaignLock` keeps it that way.
"""

from __future__ import annotations

from .base import FileRow, JobRow, Store, SyncReport
from .lock import CampaignLock
from .sqlite import SCHEMA_VERSION, SqliteStore

__all__ = ["SCHEMA_VERSION", "CampaignLock", "FileRow", "JobRow", "SqliteStore", "Store", "SyncReport"]
