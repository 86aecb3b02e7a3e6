"""A real PostgreSQL for the tests: a fresh database per test, created from a template that
holds the current schema (made once per session). Where no server answers, the tests that
need one are skipped with the reason; when `CI` is set they fail instead.

The server: `DREAMLOOK_TEST_POSTGRES`, by default 127.0.0.1:5432 as user postgres (trust
authentication, as on this project's machines).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
import pytest

from orchestrator.store.postgres import PostgresStore

SERVER = os.environ.get("DREAMLOOK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = "dlb_test_"
_numbers = itertools.count()


def database_url(name: str, server: str = SERVER) -> str:
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(SERVER, autocommit=True, connect_timeout=5)


def _server_or_skip() -> None:
    try:
        _admin().close()
    except psycopg.Error as exc:
        why = f"no PostgreSQL at {SERVER} ({str(exc).strip().splitlines()[0]}); set DREAMLOOK_TEST_POSTGRES"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def _drop_leftovers(admin: psycopg.Connection[tuple[object, ...]]) -> None:
    """Databases of test sessions that were killed: their process is gone."""
    for (name,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (PREFIX + "%",)):
        pid = str(name).removeprefix(PREFIX).split("_")[0]
        if pid.isdigit() and not _alive(int(pid)):
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """The name of a database with the current schema, to copy."""
    _server_or_skip()
    name = f"{PREFIX}{os.getpid()}_template"
    with _admin() as admin:
        _drop_leftovers(admin)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')

    async def migrate() -> None:
        store = await PostgresStore.open(database_url(name), "template")
        await store.close()

    anyio.run(migrate)
    yield name
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def _fresh_database(template: str | None) -> Iterator[str]:
    name = f"{PREFIX}{os.getpid()}_{next(_numbers)}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    yield database_url(name)
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """The URL of a fresh database of this test's own, with the schema in place."""
    with _fresh_database(pg_template) as url:
        yield url


@pytest.fixture
def pg_empty_url(pg_template: str) -> Iterator[str]:
    """A fresh database without the schema: for the tests of creating it."""
    with _fresh_database(None) as url:
        yield url
