"""Ranged downloads (`transfer/ranges.py`) driven directly against the simulator's storage, with the
proven spans in a real SQLite state store: what lands on disk, what is recorded, what is counted,
and what storage is asked for, fresh and on resume."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio
import pytest

from orchestrator.config import RetryPolicy
from orchestrator.errors import DownloadError, ObjectChanged, RangesIgnored
from orchestrator.run.download import StorePartLog
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator
from orchestrator.store import SqliteDb
from orchestrator.store.threaded import SqliteStore
from orchestrator.transfer.progress import Transfer
from orchestrator.transfer.ranges import BLOCK_BYTES, _proven_spans, fetch_ranges
from orchestrator.transfer.verify import Hashes, StorageHashes

from .conftest import fast_sim
from .simhttp import Http
from .test_sim_storage import trained

pytestmark = pytest.mark.anyio

RANGE = BLOCK_BYTES + 1000  # each range: one full block, then a tail
SIZE = 2 * RANGE + 7  # three ranges; the last one only a tail
QUICK = RetryPolicy(attempts=3, total_s=30.0, backoff_min_s=0.001, backoff_max_s=0.002)
TWO_TRIES = RetryPolicy(attempts=2, total_s=30.0, backoff_min_s=0.001, backoff_max_s=0.002)


class FixedUrl:
    """A source whose signed URL never expires (none does here)."""

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def url(self) -> str:
        return self._url

    async def renew_after(self, stale_url: str) -> None:
        raise AssertionError(f"no URL expires in these tests: {stale_url}")


@dataclass(frozen=True)
class Stored:
    url: str
    body: bytes
    etag: str
    md5: str


async def stored_checkpoint(sim: Simulator) -> Stored:
    async with Http(sim) as http:
        job = await trained(http)
        url = job["dreambooth_result"]["checkpoints"][0]["url"]
        status, body, headers = await http.raw(url)
    assert status == 200 and len(body) == SIZE
    md5 = dict(item.split("=", 1) for item in headers["x-goog-hash"].split(","))["md5"]
    assert base64.b64decode(md5) == hashlib.md5(body).digest()
    return Stored(url=url, body=body, etag=headers["ETag"], md5=md5)


async def fetch(
    stored: Stored,
    part: Path,
    log: StorePartLog,
    *,
    size: int = SIZE,
    connections: int = 2,
    transfer: Transfer | None = None,
    policy: RetryPolicy = QUICK,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[Hashes, StorageHashes]:
    with ThreadPoolExecutor(2) as own:
        async with aiohttp.ClientSession() as session:
            return await fetch_ranges(
                session,
                FixedUrl(stored.url),
                part,
                size,
                log,
                connections=connections,
                range_bytes=RANGE,
                policy=policy,
                transfer=transfer,
                pool=pool or own,
            )


async def open_log(tmp_path: Path) -> StorePartLog:
    store = await SqliteStore.open(tmp_path / "state.db")
    return StorePartLog(store, "job-1", "ckp_1")


async def close_log(log: StorePartLog) -> None:
    assert isinstance(log.store, SqliteStore)
    await log.store.close()


def part_holding(tmp_path: Path, data: bytes, size: int) -> Path:
    part = tmp_path / "out" / "model.safetensors.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data + bytes(size - len(data)))
    return part


async def test_a_fresh_ranged_download_writes_the_file_records_its_etag_and_counts_every_byte_once(
    tmp_path: Path,
) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        stored = await stored_checkpoint(sim)
        log = await open_log(tmp_path)
        part = tmp_path / "out" / "model.safetensors.part"
        transfer = Transfer("model", SIZE)
        try:
            hashes, expected = await fetch(stored, part, log, transfer=transfer)
            record = await log.record()
        finally:
            await close_log(log)
    assert part.read_bytes() == stored.body
    assert hashes.sha.hexdigest() == hashlib.sha256(stored.body).hexdigest()
    assert expected.md5 == stored.md5 and hashes.md5_b64() == stored.md5
    assert expected.crc32c is not None and hashes.crc32c_b64() == expected.crc32c
    assert transfer.done == transfer.received == SIZE  # the progress figures: every byte fetched, once
    assert record is not None and record.etag == stored.etag  # a resume can tell a rewritten object
    assert record.size == SIZE and record.covered() == [(0, SIZE)]


async def test_a_part_proven_of_an_object_with_another_etag_is_refused_as_changed(tmp_path: Path) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        stored = await stored_checkpoint(sim)
        log = await open_log(tmp_path)
        part = part_holding(tmp_path, stored.body[:RANGE], SIZE)
        try:
            await log.start_over(SIZE)
            await log.set_etag('"an-older-generation-1"')
            await log.prove(0, RANGE)
            with pytest.raises(ObjectChanged, match="ETag"):
                await fetch(stored, part, log, connections=1)
            record = await log.record()
        finally:
            await close_log(log)
    assert record is not None and record.etag == '"an-older-generation-1"' and record.covered() == [(0, RANGE)]


async def test_a_part_proven_to_its_last_byte_is_hashed_without_asking_storage(tmp_path: Path) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        stored = await stored_checkpoint(sim)
        asked_before = len(sim.ledger.downloads)
        log = await open_log(tmp_path)
        part = part_holding(tmp_path, stored.body, SIZE)
        try:
            await log.start_over(SIZE)
            await log.set_etag(stored.etag)
            await log.prove(0, RANGE)
            await log.prove(RANGE, SIZE - RANGE)
            hashes, expected = await fetch(stored, part, log)
            record = await log.record()
        finally:
            await close_log(log)
        assert len(sim.ledger.downloads) == asked_before  # nothing fetched again
    assert part.read_bytes() == stored.body
    assert hashes.sha.hexdigest() == hashlib.sha256(stored.body).hexdigest()
    # No answer, so no md5 from storage: none to compare with (an empty one would never match).
    assert expected == StorageHashes() and hashes.md5_b64() is None and hashes.crc32c_b64() is None
    assert record is not None and record.covered() == [(0, SIZE)]


async def test_spans_proven_beyond_the_end_of_a_shortened_part_are_fetched_again(tmp_path: Path) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        stored = await stored_checkpoint(sim)
        log = await open_log(tmp_path)
        part = tmp_path / "out" / "model.safetensors.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(stored.body[:100])  # the record says RANGE bytes are proven; the file holds 100
        try:
            await log.start_over(SIZE)
            await log.set_etag(stored.etag)
            await log.prove(0, RANGE)
            hashes, _ = await fetch(stored, part, log)
        finally:
            await close_log(log)
    assert part.read_bytes() == stored.body
    assert hashes.sha.hexdigest() == hashlib.sha256(stored.body).hexdigest()


async def test_starting_over_leaves_a_part_of_zeros_not_the_old_bytes(tmp_path: Path) -> None:
    part = tmp_path / "model.safetensors.part"
    part.write_bytes(b"old!" * 250)
    db = SqliteDb(tmp_path / "state.db")
    log = StorePartLog(SqliteStore(db), "job-1", "ckp_1")
    try:
        db.part_start_over("job-1", "ckp_1", 999)  # proven of an object of another size
        db.part_prove("job-1", "ckp_1", 0, 999)
        with ThreadPoolExecutor(1) as pool:
            covered, etag = await _proven_spans(part, 600, log, pool)
        record = db.part_record("job-1", "ckp_1")
    finally:
        db.close()
    assert (covered, etag) == ([], None)
    assert part.read_bytes() == bytes(600)  # a fresh (sparse) part: none of the old bytes
    assert record is not None and (record.size, record.spans) == (600, ())


async def test_storage_that_answers_a_range_with_the_whole_file_is_reported_as_ignoring_ranges(
    tmp_path: Path,
) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        stored = await stored_checkpoint(sim)
        sim.set_faults(FaultPlan(script=(ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.IGNORE_RANGE),)))
        log = await open_log(tmp_path)
        try:
            with pytest.raises(RangesIgnored):  # the caller then goes to one stream
                await fetch(stored, tmp_path / "m.part", log, connections=1)
        finally:
            await close_log(log)
        assert [d.status for d in sim.ledger.downloads[-1:]] == [200]  # one answer, not retried as a range


async def test_an_object_of_another_size_than_expected_is_refused_as_changed(tmp_path: Path) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        stored = await stored_checkpoint(sim)
        log = await open_log(tmp_path)
        try:
            with pytest.raises(ObjectChanged, match=f"storage now has {SIZE} bytes, not {SIZE - 10}"):
                await fetch(stored, tmp_path / "m.part", log, size=SIZE - 10, connections=1)
        finally:
            await close_log(log)


async def test_a_range_storage_keeps_failing_is_named_by_its_bytes_in_the_log_and_the_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.api.retry")
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        stored = await stored_checkpoint(sim)
        fault = ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.SERVER_ERROR, count=2)
        sim.set_faults(FaultPlan(script=(fault,)))
        log = await open_log(tmp_path)
        try:
            with pytest.raises(DownloadError) as caught:
                await fetch(stored, tmp_path / "m.part", log, connections=1, policy=TWO_TRIES)
        finally:
            await close_log(log)
    first = f"bytes 0-{RANGE - 1}"
    assert str(caught.value) == f"{first}: storage answered HTTP 503"
    retries = [r.getMessage() for r in caplog.records if "download.range_retry" in r.getMessage()]
    assert len(retries) == 1 and f'what="{first}" attempt=1 ' in retries[0], retries


def on_disk(part: Path) -> bytes | None:
    return part.read_bytes() if part.exists() else None


@pytest.mark.parametrize("scenario", ["fresh", "short-part", "head-missing"])
async def test_a_ranged_download_touches_the_part_only_on_the_downloads_own_threads(
    tmp_path: Path, scenario: str
) -> None:
    """Every write, sync, read-back and hash of a part runs on the pool the download is given
    (aiofiles' executor: a few threads for all downloads). Holding its only thread, the test lets
    the download take one step of disk work at a time: while the test holds it, not a byte of
    the part may change. Resumed: a part shorter than the file (to be extended), or one missing
    only its first 500 bytes (one short write)."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        stored = await stored_checkpoint(sim)
        log = await open_log(tmp_path)
        part = tmp_path / "out" / "model.safetensors.part"
        if scenario != "fresh":
            part.parent.mkdir(parents=True)
            await log.start_over(SIZE)
            await log.set_etag(stored.etag)
        if scenario == "short-part":
            part.write_bytes(stored.body[:RANGE])
            await log.prove(0, RANGE)
        elif scenario == "head-missing":
            part.write_bytes(bytes(500) + stored.body[500:])
            await log.prove(500, SIZE - 500)
        pool = ThreadPoolExecutor(1)
        gate, holding = threading.Semaphore(0), threading.Event()

        def hold() -> None:
            holding.set()
            gate.acquire()

        pool.submit(hold)  # the test holds the only thread
        result: list[tuple[Hashes, StorageHashes]] = []
        steps = 0

        async def download() -> None:
            result.append(await fetch(stored, part, log, connections=1, pool=pool))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(download)
                try:
                    with anyio.fail_after(30):
                        while True:
                            while not holding.is_set():  # noqa: ASYNC110
                                await anyio.sleep(0.001)
                            held = on_disk(part)
                            while not result and pool._work_queue.qsize() == 0:  # noqa: ASYNC110
                                await anyio.sleep(0.001)
                            assert on_disk(part) == held, f"the part changed off the download's threads (step {steps})"
                            if result:
                                break
                            holding.clear()
                            pool.submit(hold)  # queued behind the download's next step: held again after it
                            gate.release()  # one step of disk work for the download
                            steps += 1
                finally:
                    gate.release(1000)  # let the download (shielded on its pool) and every hold still queued go
        finally:
            pool.shutdown(cancel_futures=True)
            await close_log(log)
    assert part.read_bytes() == stored.body
    assert result[0][0].sha.hexdigest() == hashlib.sha256(stored.body).hexdigest()
    assert steps >= 3  # it did wait for the thread, step by step
