"""What only the PostgreSQL store must show (the contract suite covers the verbs): a schema
that several hosts can create at once, campaigns that share a database without seeing one
another, a URL whose password never shows, and a server that is down said plainly."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
import pytest

from orchestrator.errors import StoreError
from orchestrator.models import JobState
from orchestrator.store.pg_schema import PG_SCHEMA_VERSION
from orchestrator.store.postgres import PostgresStore

from .test_store_contract import SPECS, T0, synced

pytestmark = pytest.mark.anyio


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.replace("@", f":{password}@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def test_what_is_committed_is_there_for_the_next_process_and_the_password_never_shows(pg_url: str) -> None:
    url = with_password(pg_url, "s3cret-pw")  # trust authentication ignores it; we must still hide it
    async with await PostgresStore.open(url, "c") as store:
        await synced(store)
        await store.record_intents([("a", "{}", "fp")], T0)
        await store.mark_submitted("a", "remote-a", T0)
        assert "s3cret-pw" not in store.location and store.location.endswith(urlsplit(pg_url).path)
    async with await PostgresStore.open(pg_url, "c") as store:
        row = await store.job("a")
        assert (row.state, row.remote_id) == (JobState.QUEUED, "remote-a")


async def test_two_campaigns_share_a_database_and_see_only_their_own_jobs(pg_url: str) -> None:
    async with await PostgresStore.open(pg_url, "c") as one, await PostgresStore.open(pg_url, "other") as two:
        await synced(one)
        await synced(two, SPECS[:1], campaign="other")
        await two.record_intents([("a", "{}", "fp")], T0)
        assert (await one.counts()) == {JobState.PENDING: 3}
        assert (await two.counts()) == {JobState.SUBMITTING: 1}
        assert [r.id for r in await two.jobs()] == ["a"]


async def test_hosts_starting_together_create_the_schema_once(pg_empty_url: str) -> None:
    stores: list[PostgresStore] = []

    async def start() -> None:
        stores.append(await PostgresStore.open(pg_empty_url, "c"))

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(start)
    for store in stores:
        await store.close()
    with psycopg.connect(pg_empty_url) as db:
        assert db.execute("SELECT value FROM dlb_meta").fetchall() == [(str(PG_SCHEMA_VERSION),)]
        assert db.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'dlb_jobs'").fetchone() == (1,)


async def test_a_database_written_by_a_newer_version_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE dlb_meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match=r"newer dreamlook-batch \(schema 99"):
        await PostgresStore.open(pg_url, "c")


async def test_a_server_that_does_not_answer_is_said_plainly_without_the_password() -> None:
    url = "postgresql://someone:hunter2@127.0.0.1:1/nothing"
    with pytest.raises(StoreError) as caught:
        await PostgresStore.open(url, "c")
    message = str(caught.value)
    assert "hunter2" not in message and "127.0.0.1:1/nothing" in message and "refused" in message


async def test_two_hosts_recording_one_intent_at_once_record_it_once(pg_url: str) -> None:
    async with await PostgresStore.open(pg_url, "c") as one, await PostgresStore.open(pg_url, "c") as two:
        await synced(one)
        outcomes: list[str] = []

        async def intend(store: PostgresStore, who: str) -> None:
            try:
                await store.record_intents([("a", "{}", who)], T0)
                outcomes.append(who)
            except StoreError as exc:
                outcomes.append(f"refused: {exc}")

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(intend, one, "one")
                tg.start_soon(intend, two, "two")
        winners = [o for o in outcomes if not o.startswith("refused")]
        assert len(winners) == 1 and len(outcomes) == 10
        assert (await two.job("a")).sent_fingerprint == winners[0]
