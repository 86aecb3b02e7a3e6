"""The `Store` contract, written once and run against every backend.

Each test speaks only the `Store` Protocol's awaitable verbs: every backend in `BACKENDS`
(SQLite in a file and in memory, PostgreSQL in a fresh database) passes this file. The
guarantees are those docs/architecture.md states: no second intent, ids recorded only
for the jobs that expect them, the state machine, `unknown` left only by a person,
dependents skipped exactly while their parent can give no checkpoint, proven spans
forgotten once a file is placed, pages in manifest order, uploads into a bucket recorded
part by part (one upload per file) until they are forgotten.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from orchestrator.errors import StoreError
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import ArtifactKind, JobSpec, JobState, JobType
from orchestrator.store import FileRow, SqliteStore, Store, UploadedPart, UploadRecord
from orchestrator.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio
T0 = 1_000.0

Opener = Callable[[Path], AbstractAsyncContextManager[Store]]


@asynccontextmanager
async def sqlite_file(folder: Path) -> AsyncIterator[Store]:
    store = await SqliteStore.open(folder / "contract.db")
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def sqlite_memory(folder: Path) -> AsyncIterator[Store]:
    store = await SqliteStore.open(Path(":memory:"))
    try:
        yield store
    finally:
        await store.close()


def postgres(url: str) -> Opener:
    @asynccontextmanager
    async def opened(folder: Path) -> AsyncIterator[Store]:
        store = await PostgresStore.open(url, "c")
        try:
            yield store
        finally:
            await store.close()

    return opened


BACKENDS = ["sqlite-file", "sqlite-memory", "postgres"]


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest) -> Opener:
    if request.param == "postgres":
        return postgres(request.getfixturevalue("pg_url"))  # skipped (or failed, in CI) without a server
    return sqlite_file if request.param == "sqlite-file" else sqlite_memory


def spec(job_id: str, *, parent: str | None = None, prompt: str = "p") -> JobSpec:
    job_type = JobType.IMAGE_GEN if parent else JobType.DREAMBOOTH
    return JobSpec(id=job_id, type=job_type, payload={"prompt": prompt}, checkpoint_from=parent)


SPECS = [spec("a"), spec("b"), spec("a-pics", parent="a")]


async def synced(store: Store, specs: list[JobSpec] = SPECS, campaign: str = "c") -> None:
    await store.sync_manifest(campaign, specs, [spec_fingerprint(s) for s in specs], T0)


def file_row(job_id: str, name: str, size: int) -> FileRow:
    return FileRow(
        job_id=job_id,
        remote_id=f"f-{name}",
        name=name,
        kind=ArtifactKind.CHECKPOINT,
        size_bytes=size,
        sha256=None,
        done=False,
        lost=False,
    )


async def test_a_manifest_sync_reports_what_was_added_changed_and_removed(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        report = await store.sync_manifest("c", SPECS, [spec_fingerprint(s) for s in SPECS], T0)
        assert report.added == ("a", "b", "a-pics") and report.removed == () and report.changed_after_submit == ()
        await store.record_intents([("b", "{}", spec_fingerprint(SPECS[1]))], T0)
        edited = [spec("a"), spec("b", prompt="other")]
        report = await store.sync_manifest("c", edited, [spec_fingerprint(s) for s in edited], T0)
        assert report.added == () and report.changed_after_submit == ("b",) and report.removed == ("a-pics",)
        assert [r.id for r in await store.jobs()] == ["a", "b", "a-pics"]
        assert (await store.counts()) == {JobState.PENDING: 1, JobState.SUBMITTING: 1}  # a-pics left the manifest
        with pytest.raises(StoreError, match="holds campaign 'c'"):
            await synced(store, campaign="another")


async def test_an_intent_is_recorded_once_and_an_id_only_for_a_job_being_submitted(
    opener: Opener, tmp_path: Path
) -> None:
    async with opener(tmp_path) as store:
        await synced(store)
        await store.record_intents([("a", '{"prompt": "p"}', "fp")], T0 + 1)
        row = await store.job("a")
        assert row.state is JobState.SUBMITTING and row.intent_at == T0 + 1 and row.sent_payload == '{"prompt": "p"}'
        assert await store.record_intents([("a", "{}", "other")], T0 + 2) == []  # not pending: not recorded
        assert (await store.job("a")).sent_fingerprint == "fp"
        two_in_flight = await store.record_intents([("a-pics", "{}", "fp"), ("b", "{}", "fp")], T0 + 2, max_active=2)
        assert two_in_flight == ["a-pics"]
        with pytest.raises(StoreError, match="not recorded"):
            await store.mark_submitted("b", "remote-b", T0 + 2)  # never sent: no id may land on it
        await store.mark_submitted("a", "remote-a", T0 + 3, next_check_at=T0 + 60)
        row = await store.job("a")
        assert (row.state, row.remote_id, row.submitted_at, row.next_check_at) == (
            JobState.QUEUED,
            "remote-a",
            T0 + 3,
            T0 + 60,
        )
        with pytest.raises(StoreError):
            await store.mark_submitted("a", "remote-a2", T0 + 4)  # a second id never replaces the first
        assert (await store.job("a")).remote_id == "remote-a"
        with pytest.raises(StoreError, match="no job"):
            await store.job("nobody")


async def test_a_lost_answer_keeps_the_latest_window_and_a_provably_absent_job_forgets_its_intent(
    opener: Opener, tmp_path: Path
) -> None:
    async with opener(tmp_path) as store:
        await synced(store)
        await store.record_intents([("a", "{}", "fp")], T0)
        await store.record_attempt("a", T0 + 1, T0 + 100)
        await store.answer_lost("a", T0 + 50)  # an earlier end never shortens the window
        row = await store.job("a")
        assert row.attempt_at == T0 + 1 and row.reconcile_at == T0 + 100
        await store.move("a", JobState.PENDING, T0 + 200)
        row = await store.job("a")
        assert row.state is JobState.PENDING and row.intent_at is None and row.sent_payload is None


async def test_moves_follow_the_state_machine_and_only_a_person_leaves_unknown(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        await synced(store)
        with pytest.raises(StoreError, match="cannot move"):
            await store.move("a", JobState.DONE, T0)  # pending -> done skips the whole life
        with pytest.raises(StoreError, match="may still give a checkpoint"):
            await store.move("a-pics", JobState.SKIPPED, T0)  # its parent has not even been sent
        await store.record_intents([("a", "{}", "fp")], T0)
        await store.move("a", JobState.UNKNOWN, T0 + 1, reason="cannot tell")
        await store.move("a-pics", JobState.SKIPPED, T0 + 1)  # no checkpoint can come now
        for target in (JobState.PENDING, JobState.QUEUED, JobState.FAILED):
            with pytest.raises(StoreError):
                await store.move("a", target, T0 + 2)
        with pytest.raises(StoreError, match="not unknown"):
            await store.settle("b", JobState.FAILED, T0 + 2, remote_id=None, reason="by hand")
        revived = await store.settle("a", JobState.QUEUED, T0 + 3, remote_id="remote-a", reason="by hand")
        assert revived == ("a-pics",) and (await store.job("a-pics")).state is JobState.PENDING
        row = await store.job("a")
        assert row.state is JobState.QUEUED and row.remote_id == "remote-a" and row.finished_at is None


async def test_a_success_brings_the_checkpoint_and_the_files_and_placed_files_forget_their_spans(
    opener: Opener, tmp_path: Path
) -> None:
    async with opener(tmp_path) as store:
        await synced(store)
        await store.record_intents([("a", "{}", "fp")], T0)
        await store.mark_submitted("a", "remote-a", T0)
        files = [file_row("a", "m.safetensors", 100), file_row("a", "l.safetensors", 10)]
        await store.record_success("a", checkpoint_id="ckpt", files=files, remote_state="success", now=T0 + 5)
        row = await store.job("a")
        assert row.state is JobState.SUCCEEDED and row.checkpoint_id == "ckpt" and row.ended_at == T0 + 5
        assert [f.name for f in await store.files("a")] == ["l.safetensors", "m.safetensors"]  # by name
        ready = {r.id: (parent, checkpoint) for r, parent, checkpoint in await store.ready_to_submit(10)}
        assert ready["a-pics"] == (JobState.SUCCEEDED, "ckpt")

        assert await store.part_record("a", "f-m.safetensors") is None  # nothing proven yet
        await store.part_start_over("a", "f-m.safetensors", 100)
        await store.part_set_etag("a", "f-m.safetensors", '"e1"')
        await store.part_prove("a", "f-m.safetensors", 0, 40)
        await store.part_prove("a", "f-m.safetensors", 60, 40)
        record = await store.part_record("a", "f-m.safetensors")
        assert record is not None and (record.size, record.etag, record.spans) == (100, '"e1"', ((0, 40), (60, 40)))
        await store.part_keep_only("a", "f-m.safetensors", [(0, 20)])
        record = await store.part_record("a", "f-m.safetensors")
        assert record is not None and record.spans == ((0, 20),)

        await store.file_done("a", "f-m.safetensors", "0" * 64, 100)
        assert await store.part_record("a", "f-m.safetensors") is None  # placed: its spans are forgotten
        await store.file_lost("a", "f-l.safetensors")
        assert [(f.name, f.done, f.lost) for f in await store.files("a")] == [
            ("l.safetensors", False, True),
            ("m.safetensors", True, False),
        ]
        assert await store.files_done_total() == (1, 100)
        await store.file_missing("a", "f-m.safetensors")  # the placed file vanished from disk
        assert await store.files_done_total() == (0, 0)
        assert {k: [f.name for f in v] for k, v in (await store.files_by_job()).items()} == {
            "a": ["l.safetensors", "m.safetensors"]
        }
        assert len(await store.all_files()) == 2


async def test_adoption_takes_only_pending_jobs_never_looked_for(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        await synced(store)
        assert [r.id for r in await store.adoption_candidates()] == ["a", "b", "a-pics"]
        await store.adopt([("a", "remote-a", T0 + 30)], ["a", "b"], T0)
        row = await store.job("a")
        assert row.state is JobState.QUEUED and row.remote_id == "remote-a" and row.adoption_checked
        assert [r.id for r in await store.adoption_candidates()] == ["a-pics"]
        with pytest.raises(StoreError, match="not pending"):
            await store.adopt([("a", "remote-a2", None)], [], T0)
        assert (await store.job("a")).remote_id == "remote-a"


async def test_duplicates_are_kept_and_news_is_told_once(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        await synced(store)
        assert await store.record_duplicates("a", ["x", "y"])
        assert not await store.record_duplicates("a", ["y"])  # nothing new
        assert await store.record_duplicates("a", ["z"])
        assert await store.duplicates() == {"a": ("x", "y", "z")}
        assert (await store.job("a")).duplicate_ids == ("x", "y", "z")


async def test_checks_come_due_in_order_and_tallies_count(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        await synced(store)
        await store.record_intents([("a", "{}", "fp"), ("b", "{}", "fp")], T0)
        await store.mark_submitted_many([("a", "remote-a", T0 + 10), ("b", "remote-b", T0 + 20)], T0)
        assert [r.id for r in await store.due_for_check(T0 + 15)] == ["a"]
        assert await store.next_check_due(T0 + 15) == T0 + 20
        await store.update_remote("b", remote_state="running", percentage=50.0, next_check_at=T0 + 40, now=T0 + 16)
        await store.move("b", JobState.RUNNING, T0 + 16)
        await store.check_at("a", T0 + 30)
        assert await store.next_check_due(T0 + 15) == T0 + 30
        assert await store.count([JobState.QUEUED, JobState.RUNNING]) == 2
        assert await store.ids([JobState.RUNNING]) == ["b"]
        assert {r.id for r in await store.jobs_by_id(["a", "b", "none"])} == {"a", "b"}
        assert await store.jobs_by_id([]) == []
        assert await store.newest_submitted(JobType.DREAMBOOTH.value, 1) <= {"a", "b"}
        row = await store.job("b")
        assert (row.remote_state, row.percentage) == ("running", 50.0)
        await store.record_success("b", checkpoint_id=None, files=[], remote_state="success", now=T0 + 100)
        assert await store.durations(JobType.DREAMBOOTH.value) == [100.0]


async def test_manifest_pages_hold_every_job_once_in_manifest_order(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        specs = [spec(f"j{i}") for i in (3, 1, 4, 0, 2)]
        await synced(store, specs)
        pages = [page async for page in store.manifest_pages(2)]
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [row.id for page in pages for row, _ in page] == ["j3", "j1", "j4", "j0", "j2"]
        assert [page async for page in store.manifest_pages(2, removed=True)] == []
        await store.check_writable()
        # Jobs dropped from the manifest are paged apart (they may have been paid for), with
        # their files; the manifest's pages hold only its jobs. Back in the manifest: back there.
        await store.record_intents([("j4", "{}", "fp")], T0)
        await store.mark_submitted("j4", "remote-j4", T0)
        await store.record_success(
            "j4", checkpoint_id=None, files=[file_row("j4", "m", 5)], remote_state="success", now=T0
        )
        await synced(store, [spec("j2"), spec("j3")])
        assert [r.id for page in [p async for p in store.manifest_pages(2)] for r, _ in page] == ["j2", "j3"]
        gone = [item for page in [p async for p in store.manifest_pages(2, removed=True)] for item in page]
        assert [(r.id, r.in_manifest) for r, _ in gone] == [("j1", False), ("j4", False), ("j0", False)]
        assert [f.name for f in dict((r.id, fs) for r, fs in gone)["j4"]] == ["m"]
        await synced(store, [spec("j4")])
        again = {r.id for page in [p async for p in store.manifest_pages(9, removed=True)] for r, _ in page}
        assert again == {"j0", "j1", "j2", "j3"}
        assert [r.id for page in [p async for p in store.manifest_pages(9)] for r, _ in page] == ["j4"]


async def test_what_a_file_store_commits_is_there_when_it_is_opened_again(tmp_path: Path) -> None:
    async with sqlite_file(tmp_path) as store:
        await synced(store)
        await store.record_intents([("a", "{}", "fp")], T0)
        await store.mark_submitted("a", "remote-a", T0)
    async with sqlite_file(tmp_path) as store:
        row = await store.job("a")
        assert (row.state, row.remote_id) == (JobState.QUEUED, "remote-a")
        assert store.location.endswith("contract.db")


# -- multipart uploads into a bucket: what a resumed upload is told ---------------------------

FILE = "f-m.safetensors"


async def a_file_to_fetch(store: Store) -> None:
    await synced(store)
    await store.record_intents([("a", "{}", spec_fingerprint(SPECS[0]))], T0)  # a worker sends only what is synced
    await store.mark_submitted("a", "remote-a", T0)
    files = [file_row("a", "m.safetensors", 20), file_row("a", "l.safetensors", 8)]
    await store.record_success("a", checkpoint_id=None, files=files, remote_state="success", now=T0)


async def started(store: Store, upload_id: str = "u-1", remote_id: str = FILE) -> None:
    await store.upload_started(
        "a", remote_id, upload_id=upload_id, key="out/a/m.safetensors", part_bytes=8, size=20, source_etag='"src"'
    )


def part(number: int, etag: str | None = None, length: int = 8) -> UploadedPart:
    return UploadedPart(number=number, etag=etag or f'"e{number}"', length=length, hash_state=bytes([number]) * 230)


async def test_an_upload_is_recorded_part_by_part_until_it_is_forgotten(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        await a_file_to_fetch(store)
        assert await store.upload_record("a", FILE) is None
        await started(store)
        empty = UploadRecord(
            upload_id="u-1", key="out/a/m.safetensors", part_bytes=8, size=20, source_etag='"src"', parts={}
        )
        assert await store.upload_record("a", FILE) == empty
        await store.upload_part_done("a", FILE, part(2))  # parts may finish out of order
        await store.upload_part_done("a", FILE, part(1))
        await store.upload_part_done("a", FILE, part(3, length=4))
        record = await store.upload_record("a", FILE)
        assert record is not None and dict(record.parts) == {1: part(1), 2: part(2), 3: part(3, length=4)}
        assert record.parts[3].hash_state == bytes([3]) * 230  # the digest state, byte for byte
        assert await store.upload_record("a", "f-l.safetensors") is None  # one record per file
        await store.upload_forget("a", FILE)
        assert await store.upload_record("a", FILE) is None


async def test_a_new_upload_of_a_file_replaces_the_earlier_one_and_its_parts(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        await a_file_to_fetch(store)
        await started(store, "u-1")
        await store.upload_part_done("a", FILE, part(1))
        await store.upload_part_done("a", FILE, part(2))
        await store.upload_started("a", FILE, upload_id="u-2", key="out/a/m2", part_bytes=16, size=20, source_etag=None)
        # The parts of u-1 would not complete u-2: none of them is left.
        assert await store.upload_record("a", FILE) == UploadRecord(
            upload_id="u-2", key="out/a/m2", part_bytes=16, size=20, source_etag=None, parts={}
        )


async def test_a_part_sent_again_replaces_the_one_of_its_number_and_files_keep_their_own(
    opener: Opener, tmp_path: Path
) -> None:
    async with opener(tmp_path) as store:
        await a_file_to_fetch(store)
        await started(store)
        await started(store, "u-l", remote_id="f-l.safetensors")
        await store.upload_part_done("a", FILE, part(1, '"first"'))
        await store.upload_part_done("a", "f-l.safetensors", part(1, '"other file"'))
        await store.upload_part_done("a", FILE, part(1, '"again"', length=7))  # the bucket keeps the last one
        record = await store.upload_record("a", FILE)
        assert record is not None and dict(record.parts) == {1: part(1, '"again"', length=7)}
        other = await store.upload_record("a", "f-l.safetensors")
        assert other is not None and dict(other.parts) == {1: part(1, '"other file"')}


async def test_a_part_with_no_upload_recorded_is_ignored(opener: Opener, tmp_path: Path) -> None:
    async with opener(tmp_path) as store:
        await a_file_to_fetch(store)
        await store.upload_part_done("a", FILE, part(1))  # never started: no error, nothing recorded
        assert await store.upload_record("a", FILE) is None
        await started(store)
        await store.upload_forget("a", FILE)
        await store.upload_part_done("a", FILE, part(2))  # in flight while the upload was forgotten
        assert await store.upload_record("a", FILE) is None


async def test_an_upload_recorded_is_there_for_the_next_process(opener: Opener, tmp_path: Path) -> None:
    if opener is sqlite_memory:
        pytest.skip("a store in memory ends with its process")
    async with opener(tmp_path) as store:
        await a_file_to_fetch(store)
        await started(store)
        await store.upload_part_done("a", FILE, part(1))
        before = await store.upload_record("a", FILE)
    async with opener(tmp_path) as store:
        after = await store.upload_record("a", FILE)
        assert after is not None and after == before and list(after.parts) == [1]
