"""One process at a time drives a campaign kept in PostgreSQL: a session-level advisory lock
on a connection of its own, held for the run. The server drops it when that connection
ends (the process died, even by SIGKILL, or its host went away), so a crashed run never
blocks the next one. The holder is named by the connection's application_name.
"""

from __future__ import annotations

from types import TracebackType

import psycopg
from psycopg import AsyncConnection

from ..errors import CampaignLocked, StoreError
from .pg_base import CONNECT_TIMEOUT_S, describe, safe_url

APP_PREFIX = "dreamlook-batch "


class PostgresLock:
    def __init__(self, url: str, campaign: str, holder: str) -> None:
        self._url, self._campaign, self._holder = url, campaign, holder
        self._conn: AsyncConnection[tuple[object, ...]] | None = None

    @property
    def _key(self) -> str:
        return f"dreamlook-batch/{self._campaign}"

    async def __aenter__(self) -> PostgresLock:
        where = f"{safe_url(self._url)} (campaign {self._campaign})"
        try:
            conn = await AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=int(CONNECT_TIMEOUT_S),
                application_name=(APP_PREFIX + self._holder)[:63],
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the state store {safe_url(self._url)}: {describe(exc)}") from exc
        try:
            cur = await conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self._key,))
            row = await cur.fetchone()
            if row is None or not row[0]:
                holder = await self._holder_of(conn)
                raise CampaignLocked(where, holder)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return self

    async def _holder_of(self, conn: AsyncConnection[tuple[object, ...]]) -> str:
        cur = await conn.execute(
            "SELECT a.application_name, a.client_addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.pid <> pg_backend_pid()"
            " AND (l.classid::bigint << 32 | l.objid::bigint) = hashtextextended(%s, 0)",
            (self._key,),
        )
        row = await cur.fetchone()
        if row is None:
            return "unknown process"
        name, addr = str(row[0]).removeprefix(APP_PREFIX), row[1]
        return f"{name}, connected from {addr}" if addr else str(name)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None:
            await self._conn.close()  # the lock goes with the session
            self._conn = None
