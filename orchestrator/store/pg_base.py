"""What the PostgreSQL store's verbs stand on: the connection pool, one transaction per
verb, psycopg's errors translated to `StoreError`, and the URL shown without its password.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..api import retry
from ..errors import StoreConflict, StoreError
from ..models import PARENT_ENDED

POOL_MAX = 4  # connections per process: the verbs are short, and the engine awaits most in turn
CONNECT_TIMEOUT_S = 10.0  # a database that does not answer is said so within this
SCHEMES = ("postgresql", "postgres")
ENDED = [s.value for s in PARENT_ENDED]
# The parent `p` can give no checkpoint: its dependents are skipped, and only then.
DEAD_END = "(p.state = ANY(%(ended)s) AND p.checkpoint_id IS NULL)"
Pool = AsyncConnectionPool[AsyncConnection[DictRow]]
S = TypeVar("S")
P = ParamSpec("P")
T = TypeVar("T")


def is_postgres_url(value: str) -> bool:
    return value.split("://", 1)[0].lower() in SCHEMES and "://" in value


def safe_url(url: str) -> str:
    """The URL without a password (for messages, status and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def describe(exc: BaseException) -> str:
    """psycopg's message, first line only (the rest repeats the query), without a password."""
    if isinstance(exc, PoolTimeout):
        return f"no connection within {CONNECT_TIMEOUT_S:.0f} s (is the server running and reachable?)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


async def open_pool(url: str) -> Pool:
    """A pool of connections to `url`; a server that refuses or does not answer is said so at once,
    with psycopg's reason (the pool alone would retry until its timeout and say only "timeout")."""
    try:
        probe = await AsyncConnection.connect(url, connect_timeout=int(CONNECT_TIMEOUT_S))
        await probe.close()
    except psycopg.Error as exc:
        raise StoreError(f"cannot open the state store {safe_url(url)}: {describe(exc)}") from exc
    pool: Pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=POOL_MAX,
        open=False,
        timeout=CONNECT_TIMEOUT_S,
        kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": int(CONNECT_TIMEOUT_S)},
    )
    try:
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except (psycopg.Error, PoolTimeout) as exc:
        await pool.close()
        raise StoreError(f"cannot open the state store {safe_url(url)}: {describe(exc)}") from exc
    return pool


class PgBase:
    """A campaign's view of the shared database: every query names `campaign`."""

    def __init__(self, pool: Pool, url: str, campaign: str) -> None:
        self._pool, self._url, self.campaign = pool, url, campaign

    @property
    def location(self) -> str:
        return safe_url(self._url)

    async def close(self) -> None:
        await self._pool.close()

    def _tx(self) -> Transaction:
        return Transaction(self._pool, self.location)

    def _args(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"c": self.campaign, "ended": ENDED, **(args or {})}

    async def _query(self, sql: str, args: dict[str, Any] | None = None) -> list[DictRow]:
        async with self._tx() as db:
            return await (await db.execute(sql, self._args(args))).fetchall()

    async def _write(self, sql: str, args: dict[str, Any] | None = None) -> int:
        """One statement in a transaction of its own; how many rows it changed."""
        async with self._tx() as db:
            return (await db.execute(sql, self._args(args))).rowcount


def conflicts_retried(
    verb: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """A verb whose transaction the database may abort for a conflict with another worker's
    (StoreConflict: nothing was written) goes again, under `retry.store_conflicts`."""

    @functools.wraps(verb)
    async def retried(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await retry.store_conflicts(lambda: verb(self, *args, **kwargs), verb.__name__)

    return retried


def _error(location: str, exc: BaseException) -> StoreError:
    kind = (
        StoreConflict
        if isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)
        else StoreError
    )
    return kind(f"state store {location}: {describe(exc)}")


class Transaction:
    """`async with store._tx() as db`: one pooled connection, one transaction, committed at the
    end (rolled back on an error); psycopg's errors become StoreError naming the store."""

    def __init__(self, pool: Pool, location: str) -> None:
        self._pool, self._location = pool, location
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> AsyncConnection[DictRow]:
        try:
            conn = await self._stack.enter_async_context(self._pool.connection())
            await self._stack.enter_async_context(conn.transaction())
        except (psycopg.Error, PoolTimeout) as exc:
            await self._stack.aclose()
            raise _error(self._location, exc) from exc
        return conn

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._stack.__aexit__(et, e, tb)
        except psycopg.Error as exc:
            raise _error(self._location, exc) from exc
        if isinstance(e, psycopg.Error):
            raise _error(self._location, e) from e
