"""What the PostgreSQL store's verbs stand on: the connection pool, one transaction per
verb, psycopg's errors translated to `StoreError`, and the URL shown without its password.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..api import retry
from ..errors import StoreConflict, StoreError
from ..models import PARENT_ENDED

POOL_MAX = 8  # connections per process: the verbs are short; the rest wait their turn
POOL_WAIT_S = 120.0  # a verb waits this long for a free connection when every one is busy
CONNECT_TIMEOUT_S = 10.0  # a database that does not answer is said so within this
STATEMENT_TIMEOUT_S = 30.0  # no statement (or wait for a row lock) of a verb lasts longer
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
    """The URL without its password (for messages, status and logs), however it is written: in
    the user part (taken up to the last `@`, so a password with `/` or `?` in it goes too) or
    as a `password`/`sslpassword` parameter of the query."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    address, q, query = rest.partition("?")
    if "@" in address:
        userinfo, _, host = address.rpartition("@")
        address = f"{userinfo.split(':', 1)[0]}@{host}"
    kept = [p for p in query.split("&") if p and "password" not in p.split("=", 1)[0].lower()]
    return f"{scheme}://{address}" + ("?" + "&".join(kept) if q and kept else "")


def _secret_of(url: str) -> list[str]:
    """The password(s) a URL holds, to scrub from the messages of the driver."""
    rest = url.partition("://")[2]
    address, _, query = rest.partition("?")
    found = []
    if "@" in address:
        userinfo = address.rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
    found += [p.split("=", 1)[1] for p in query.split("&") if "=" in p and "password" in p.split("=", 1)[0].lower()]
    return [f for f in found if f]


def describe(exc: BaseException, url: str = "") -> str:
    """psycopg's message, first line only (the rest repeats the query), without the password."""
    if isinstance(exc, PoolTimeout):
        return f"no free connection within {POOL_WAIT_S:.0f} s (is the server running and reachable?)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for secret in _secret_of(url):
        text = text.replace(secret, "***")
    return text


async def open_pool(url: str) -> Pool:
    """A pool of connections to `url`; a server that refuses or does not answer is said so at once,
    with psycopg's reason (the pool alone would retry until its timeout and say only "timeout")."""
    try:
        probe = await AsyncConnection.connect(url, connect_timeout=int(CONNECT_TIMEOUT_S))
        await probe.close()
    except psycopg.Error as exc:
        raise StoreError(f"cannot open the state store {safe_url(url)}: {describe(exc, url)}") from exc
    pool: Pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=POOL_MAX,
        open=False,
        timeout=POOL_WAIT_S,
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "connect_timeout": int(CONNECT_TIMEOUT_S),
            # Every wait has a deadline: a statement, a lock wait, a link that went silent.
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000:.0f}"
            f" -c idle_in_transaction_session_timeout={2 * STATEMENT_TIMEOUT_S * 1000:.0f}",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        },
    )
    try:
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except (psycopg.Error, PoolTimeout) as exc:
        await pool.close()
        raise StoreError(f"cannot open the state store {safe_url(url)}: {describe(exc, url)}") from exc
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
