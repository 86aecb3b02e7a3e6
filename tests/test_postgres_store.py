"""What only the PostgreSQL store must show (the contract suite covers the verbs): a schema
that several hosts can create at once, campaigns that share a database without seeing one
another, a URL whose password never shows, a server that is down said plainly, and uploads
into a bucket that outlive a takeover but take no write from the worker that lost the job."""

from __future__ import annotations

import random
from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
import pytest

from orchestrator.api import retry
from orchestrator.api.budget import RequestBudget
from orchestrator.errors import LeaseLost, StoreConflict, StoreError
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import JobState
from orchestrator.store.pg_base import safe_url
from orchestrator.store.pg_lease import Worker
from orchestrator.store.pg_schema import PG_MIGRATIONS, PG_SCHEMA_V1, PG_SCHEMA_VERSION
from orchestrator.store.postgres import PostgresStore

from .test_store_contract import FILE, SPECS, T0, a_file_to_fetch, part, spec, started, synced

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


async def test_workers_claiming_at_once_get_each_job_exactly_once(pg_url: str) -> None:
    """Six workers race for 40 pending jobs (each asking for all of them, in its own order)
    and then for the 30 jobs to download once their leases are gone: every job is claimed
    by exactly one worker each time, and the campaign's max_active holds across them."""
    specs = [spec(f"j{i:02d}") for i in range(40)]
    fingerprints = {s.id: spec_fingerprint(s) for s in specs}
    workers = [await PostgresStore.open(pg_url, "c", worker=Worker(f"w{n}", "host", n)) for n in range(6)]
    try:
        await synced(workers[0], specs)
        got: dict[str, list[str]] = {}

        async def intend(store: PostgresStore, order: list[str]) -> None:
            for at in range(0, len(order), 7):
                batch = [(j, "{}", fingerprints[j]) for j in order[at : at + 7]]
                claimed = await store.record_intents(batch, T0, max_active=30)
                got.setdefault(store.worker.id if store.worker else "", []).extend(claimed)

        async with anyio.create_task_group() as tg:
            for n, store in enumerate(workers):
                order = [s.id for s in specs]
                random.Random(n).shuffle(order)
                tg.start_soon(intend, store, order)
        claimed = [j for ids in got.values() for j in ids]
        assert len(claimed) == len(set(claimed)) == 30  # once each, and never more than max_active
        assert (await workers[0].count([JobState.SUBMITTING])) == 30
        for store in workers:  # each records the ids of the jobs it holds; the others are fenced out
            mine = got.get(store.worker.id if store.worker else "", [])
            others = [j for j in claimed if j not in mine][:3]
            assert await store.mark_submitted_many([(j, f"r-{j}", None) for j in mine + others], T0) == sorted(others)
        for store in workers:
            for job_id in got.get(store.worker.id if store.worker else "", []):
                await store.record_success(job_id, checkpoint_id=None, files=[], remote_state="success", now=T0)
        for store in workers:
            await store.release_all()
        gained: list[str] = []

        async def claim(store: PostgresStore) -> None:
            for _ in range(5):
                gained.extend((await store.claim_work(window_end=T0, downloads=5, checks=0)).gained)

        async with anyio.create_task_group() as tg:
            for store in workers:
                tg.start_soon(claim, store)
        assert sorted(gained) == sorted(claimed)  # the 30 to download, once each, 5 per worker at most
        for store in workers:
            held = await store.held([JobState.SUCCEEDED])
            assert len(held) <= 5 and {r.id for r in held} <= set(gained)
        # Each worker counts the live ones, to take its share of the campaign's request budget.
        assert (await workers[0].claim_work(window_end=T0, downloads=0, checks=0)).workers == 6
        await workers[1].release_all()  # a worker that stops cleanly is no longer counted
        assert (await workers[0].claim_work(window_end=T0, downloads=0, checks=0)).workers == 5
        budget = RequestBudget(10.0)
        budget.share(5)
        assert (budget.rate, budget.burst) == (2.0, 2.0)
    finally:
        for store in workers:
            await store.close()


async def test_a_database_of_schema_1_is_upgraded_in_place(pg_empty_url: str) -> None:
    with psycopg.connect(pg_empty_url, autocommit=True) as db:
        db.execute("CREATE TABLE dlb_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute(PG_SCHEMA_V1)
        db.execute("INSERT INTO dlb_meta VALUES ('schema_version', '1')")
        db.execute("INSERT INTO dlb_campaigns VALUES ('c', 0)")
        db.execute(
            "INSERT INTO dlb_jobs (campaign, id, type, state, fingerprint, updated_at, position, spec)"
            " VALUES ('c', 'a', 'dreambooth', 'queued', 'fp', 0, 0, '{}')"
        )
    async with await PostgresStore.open(pg_empty_url, "c", worker=Worker("w", "host", 1)) as store:
        assert (await store.job("a")).state is JobState.QUEUED  # the rows are kept
        assert (await store.claim_work(window_end=T0, downloads=0, checks=5)).gained == ("a",)
    with psycopg.connect(pg_empty_url) as db:
        assert db.execute("SELECT value FROM dlb_meta").fetchone() == (str(PG_SCHEMA_VERSION),)


async def test_two_workers_adopting_one_job_at_once_adopt_it_once(pg_url: str) -> None:
    async with (
        await PostgresStore.open(pg_url, "c", worker=Worker("w1", "h", 1)) as one,
        await PostgresStore.open(pg_url, "c", worker=Worker("w2", "h", 2)) as two,
    ):
        await synced(one)
        await one.adopt([("a", "remote-a", None)], ["a"], T0)
        await two.adopt([("a", "remote-a", None)], ["a"], T0)  # it found the same tag: nothing to do
        row = await one.job("a")
        assert (row.state, row.remote_id, row.duplicate_ids) == (JobState.QUEUED, "remote-a", ())


async def test_workers_that_lock_each_other_out_are_told_to_go_again_and_do(pg_url: str) -> None:
    """A real deadlock between two transactions: the database aborts one, which becomes a
    StoreConflict (nothing written), and the retry policy runs a verb that met one again."""
    async with await PostgresStore.open(pg_url, "c") as store:
        await synced(store)
        both_locked_one = [anyio.Event(), anyio.Event()]
        errors: list[BaseException] = []

        async def lock(first: str, second: str, mine: anyio.Event, theirs: anyio.Event) -> None:
            try:
                async with store._tx() as db:
                    await db.execute("SELECT 1 FROM dlb_jobs WHERE id=%s FOR UPDATE", (first,))
                    mine.set()
                    await theirs.wait()
                    await db.execute("SELECT 1 FROM dlb_jobs WHERE id=%s FOR UPDATE", (second,))
            except StoreError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lock, "a", "b", both_locked_one[0], both_locked_one[1])
            tg.start_soon(lock, "b", "a", both_locked_one[1], both_locked_one[0])
        assert len(errors) == 1 and isinstance(errors[0], StoreConflict) and "deadlock" in str(errors[0])
    calls: list[int] = []

    async def conflicting_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise StoreConflict("state store: deadlock detected")
        return "written"

    assert await retry.store_conflicts(conflicting_twice, "a verb") == "written" and len(calls) == 3

    async def broken() -> str:
        calls.append(1)
        raise StoreError("state store: disk full")

    with pytest.raises(StoreError, match="disk full"):
        await retry.store_conflicts(broken, "a verb")
    assert len(calls) == 4  # any other store error is not tried again


async def test_a_worker_with_an_older_copy_of_the_manifest_does_not_send_an_edited_job(pg_url: str) -> None:
    async with await PostgresStore.open(pg_url, "c", worker=Worker("w1", "h", 1)) as stale:
        await synced(stale)
        edited = [spec("a", prompt="edited"), *SPECS[1:]]
        await synced(stale, edited)  # another host synced an edit of `a` after this worker loaded it
        old_a = spec_fingerprint(SPECS[0])
        assert await stale.record_intents([("a", "{}", old_a)], T0) == []
        assert await stale.record_intents([("a", "{}", spec_fingerprint(edited[0]))], T0) == ["a"]


async def test_an_answer_after_a_takeover_is_recorded_never_lost(pg_url: str) -> None:
    """A worker's POST is answered after its lease ran out and another worker took the job over:
    if that worker found nothing and put the job back to pending, the answer is recorded as the
    job (so nobody pays for it again); if the job has another id by then, as its duplicate."""
    fp = {s.id: spec_fingerprint(s) for s in SPECS}
    async with (
        await PostgresStore.open(pg_url, "c", worker=Worker("slow", "h", 1), lease_s=0.2) as slow,
        await PostgresStore.open(pg_url, "c", worker=Worker("next", "h", 2), lease_s=30) as other,
    ):
        await synced(slow)
        assert await slow.record_intents([("a", "{}", fp["a"]), ("b", "{}", fp["b"])], T0) == ["a", "b"]
        await anyio.sleep(0.3)  # the slow worker's leases run out
        taken = await other.claim_work(window_end=T0, downloads=0, checks=0)
        assert set(taken.taken) == {"a", "b"}
        await other.move("a", JobState.PENDING, T0)  # its listing found no job: pending again
        await other.mark_submitted("b", "remote-b-other", T0)  # found another job by its tag
        assert await slow.mark_submitted_many([("a", "remote-a", None), ("b", "remote-b", None)], T0) == ["b"]
        a, b = await other.job("a"), await other.job("b")
        assert (a.state, a.remote_id) == (JobState.QUEUED, "remote-a")
        assert (b.remote_id, b.duplicate_ids) == ("remote-b-other", ("remote-b",))
        assert await other.record_intents([("a", "{}", fp["a"])], T0) == []  # never sent again


def test_a_password_is_never_shown_however_the_url_holds_it() -> None:
    for url, shown in [
        (
            "postgresql://u:pa/ss@db.host:5432/c?sslmode=require&password=qq",
            "postgresql://u@db.host:5432/c?sslmode=require",
        ),
        ("postgres://u:p@ss@db.host/c", "postgres://u@db.host/c"),
        ("postgresql://db.host/c?sslpassword=zz", "postgresql://db.host/c"),
        ("postgresql://u@db.host/c", "postgresql://u@db.host/c"),
    ]:
        assert safe_url(url) == shown


async def test_only_a_takeover_restarts_a_lost_answers_window(pg_url: str) -> None:
    """A cron pass that claims a lost answer its last pass let go keeps the window it had (or
    passes every few minutes would push it out for ever); one taken from a worker that stopped
    renewing gets a window anew: that worker may have sent it until its lease ran out."""
    fp = {s.id: spec_fingerprint(s) for s in SPECS}
    async with await PostgresStore.open(pg_url, "c", worker=Worker("pass-1", "h", 1), lease_s=0.2) as first:
        await synced(first)
        assert await first.record_intents([("a", "{}", fp["a"]), ("b", "{}", fp["b"])], T0) == ["a", "b"]
        await first.answer_lost("a", T0 + 100)
        await first.answer_lost("b", T0 + 100)
    # pass-1 ended cleanly: it let both go. pass-2 claims them: the windows stand.
    async with await PostgresStore.open(pg_url, "c", worker=Worker("pass-2", "h", 2), lease_s=0.2) as second:
        claims = await second.claim_work(window_end=T0 + 500, downloads=0, checks=0)
        assert set(claims.gained) == {"a", "b"} and claims.taken == ()
        assert (await second.job("a")).reconcile_at == T0 + 100
        second.worker = None  # it dies without letting go (its leases simply run out)
    await anyio.sleep(0.3)
    async with await PostgresStore.open(pg_url, "c", worker=Worker("pass-3", "h", 3)) as third:
        claims = await third.claim_work(window_end=T0 + 500, downloads=0, checks=0)
        assert set(claims.taken) == {"a", "b"}
        assert (await third.job("a")).reconcile_at == T0 + 500


async def test_jobs_claimed_while_the_worker_renews_its_leases_stay_held(pg_url: str) -> None:
    """A worker renews its leases (claim_work) while it records intents on other connections:
    every job whose intent it recorded is still its own to send (a renewal that began before
    the intent must not forget it)."""
    specs = [spec(f"j{i:02d}") for i in range(60)]
    fp = {s.id: spec_fingerprint(s) for s in specs}
    async with await PostgresStore.open(pg_url, "c", worker=Worker("w", "h", 1)) as store:
        await synced(store, specs)
        recorded: list[str] = []

        async def intend() -> None:
            for s in specs:
                recorded.extend(await store.record_intents([(s.id, "{}", fp[s.id])], T0))

        async def renew() -> None:
            while len(recorded) < len(specs):
                await store.claim_work(window_end=T0, downloads=0, checks=0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(intend)
            for _ in range(3):  # renewals overlap each other and every intent
                tg.start_soon(renew)
        assert len(recorded) == 60
        refused = [j for j in recorded if not await store.record_attempt(j, T0, T0 + 1, need_s=1.0)]
        assert refused == []


async def test_one_worker_at_a_time_reads_the_job_lists_and_checks_every_job_at_the_service(pg_url: str) -> None:
    """The first worker to claim reads the lists; another hands the jobs it submitted over to
    it (except one it is reading right now), and takes the reading over when the reader stops
    renewing. `status` shows which worker reads."""
    fp = {s.id: spec_fingerprint(s) for s in SPECS}
    async with (
        await PostgresStore.open(pg_url, "c", worker=Worker("reader", "h", 1), lease_s=0.3) as reader,
        await PostgresStore.open(pg_url, "c", worker=Worker("other", "h", 2), lease_s=30) as other,
    ):
        await synced(reader)
        assert (await reader.claim_work(window_end=T0, downloads=0, checks=100)).reads_lists
        assert not (await other.claim_work(window_end=T0, downloads=0, checks=100)).reads_lists
        assert await other.record_intents([(j, "{}", fp[j]) for j in ("a", "b")], T0) == ["a", "b"]
        await other.mark_submitted_many([("a", "ra", None), ("b", "rb", None)], T0)
        claims = await other.claim_work(window_end=T0, downloads=0, checks=100, checking={"b"})
        assert not claims.reads_lists and claims.gained == ()
        assert [r.id for r in await other.held([JobState.QUEUED])] == ["b"]  # a: handed over; b: being read
        assert (await reader.claim_work(window_end=T0, downloads=0, checks=100)).gained == ("a",)
        await other.claim_work(window_end=T0, downloads=0, checks=100)  # b read: handed over too
        assert (await reader.claim_work(window_end=T0, downloads=0, checks=100)).gained == ("b",)
        assert {w.id: w.reads_lists for w in await other.workers()} == {"reader": True, "other": False}
        await anyio.sleep(0.4)  # the reader stops renewing: its leases, and its reading, run out
        claims = await other.claim_work(window_end=T0, downloads=0, checks=100)
        assert claims.reads_lists and set(claims.taken) == {"a", "b"}
        assert {w.id: w.reads_lists for w in await other.workers()} == {"reader": False, "other": True}
        await other.release_all()  # a reader that stops cleanly lets the reading go at once
        assert (await reader.claim_work(window_end=T0, downloads=0, checks=100)).reads_lists


async def test_max_new_jobs_holds_for_the_runs_that_overlap_and_starts_again_after(pg_url: str) -> None:
    """`--max-new-jobs 3` on two workers running at once: 3 new jobs in all, not 6. A worker
    that joins once both have stopped starts a new round of 3."""
    specs = [spec(f"j{i:02d}") for i in range(10)]
    intents = [(s.id, "{}", spec_fingerprint(s)) for s in specs]

    async def worker(name: str) -> PostgresStore:
        store = await PostgresStore.open(pg_url, "c", worker=Worker(name, "h", 1))
        await store.claim_work(window_end=T0, downloads=0, checks=0)  # joins the campaign
        return store

    first = await worker("first")
    await synced(first, specs)
    second = await worker("second")
    try:
        assert await first.record_intents(intents[:2], T0, max_new_jobs=3) == ["j00", "j01"]
        assert await second.record_intents(intents[2:], T0, max_new_jobs=3) == ["j02"]
        assert await first.record_intents(intents[3:], T0, max_new_jobs=3) == []
        assert await first.new_jobs_in_round() == await second.new_jobs_in_round() == 3
        await first.release_all()
        third = await worker("third")  # second still runs: the same round
        assert await third.record_intents(intents[3:], T0, max_new_jobs=3) == []
        await second.release_all()
        await third.release_all()
    finally:
        await first.close()
        await second.close()
    async with await worker("next-day") as fourth:  # nobody runs: a new round
        assert await fourth.new_jobs_in_round() == 0
        assert await fourth.record_intents(intents[3:], T0, max_new_jobs=3) == ["j03", "j04", "j05"]


async def test_a_takeover_keeps_the_upload_and_the_worker_that_lost_the_job_writes_nothing(pg_url: str) -> None:
    """An upload lives in the shared bucket: the worker that takes a download over resumes it
    (its record and parts are kept, unlike a partial file's spans), and the worker whose lease
    ran out can no longer add a part, start the file again or forget the upload."""
    async with (
        await PostgresStore.open(pg_url, "c", worker=Worker("slow", "h", 1), lease_s=0.2) as slow,
        await PostgresStore.open(pg_url, "c", worker=Worker("next", "h", 2), lease_s=30) as other,
    ):
        await a_file_to_fetch(slow)
        assert (await slow.claim_work(window_end=T0, downloads=1, checks=0)).gained == ("a",)
        await started(slow)
        await slow.upload_part_done("a", FILE, part(1))
        await anyio.sleep(0.3)  # the slow worker's lease runs out
        assert (await other.claim_work(window_end=T0, downloads=1, checks=0)).taken == ("a",)
        kept = await other.upload_record("a", FILE)
        assert kept is not None and kept.upload_id == "u-1" and list(kept.parts) == [1]
        with pytest.raises(LeaseLost):
            await slow.upload_part_done("a", FILE, part(2))
        with pytest.raises(LeaseLost):
            await started(slow, "u-slow")
        with pytest.raises(LeaseLost):
            await slow.upload_forget("a", FILE)
        assert await other.upload_record("a", FILE) == kept  # nothing changed
        await other.upload_part_done("a", FILE, part(2))  # the new holder carries on
        resumed = await other.upload_record("a", FILE)
        assert resumed is not None and list(resumed.parts) == [1, 2]


async def test_a_database_of_schema_3_gains_the_upload_tables_in_place(pg_empty_url: str) -> None:
    with psycopg.connect(pg_empty_url, autocommit=True) as db:
        db.execute("CREATE TABLE dlb_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute(PG_SCHEMA_V1)
        for version in (2, 3):
            for script in PG_MIGRATIONS[version]:
                db.execute(script)
        db.execute("INSERT INTO dlb_meta VALUES ('schema_version', '3')")
        db.execute("INSERT INTO dlb_campaigns (name, created_at) VALUES ('c', 0)")
        db.execute(
            "INSERT INTO dlb_jobs (campaign, id, type, state, fingerprint, updated_at, position, spec)"
            " VALUES ('c', 'a', 'dreambooth', 'downloading', 'fp', 0, 0, '{}')"
        )
        db.execute("INSERT INTO dlb_part_objects VALUES ('c', 'a', 'ckp_1', 100, NULL)")
    async with await PostgresStore.open(pg_empty_url, "c") as store:
        assert (await store.job("a")).state is JobState.DOWNLOADING  # the rows are kept
        assert await store.part_record("a", "ckp_1") is not None
        await started(store, remote_id="ckp_1")
        await store.upload_part_done("a", "ckp_1", part(1))
        record = await store.upload_record("a", "ckp_1")
        assert record is not None and dict(record.parts) == {1: part(1)}
    with psycopg.connect(pg_empty_url) as db:
        assert db.execute("SELECT value FROM dlb_meta").fetchone() == (str(PG_SCHEMA_VERSION),) == ("5",)
