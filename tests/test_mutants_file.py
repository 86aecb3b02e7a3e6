"""One result file to disk, called directly (`Downloader.fetch`) against the real simulator's
storage: what a resume starts from, what the store proves, what progress shows, how often a
refused URL is renewed. Each test states what a user would see (requests in the simulator's
ledger, bytes and records on disk, the figures in a message)."""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest

from orchestrator.config import FILE_RETRY, RetryPolicy
from orchestrator.errors import DownloadError
from orchestrator.models import Artifact, ArtifactKind
from orchestrator.run.download import StorePartLog
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator
from orchestrator.sim.service import JobKind
from orchestrator.store import SqliteStore
from orchestrator.store.parts import MemoryPartLog, PartLog
from orchestrator.transfer.file import IO_THREADS, MAX_RENEWALS, Downloader

from .conftest import fast_sim, until

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
SIZE = 3 * MiB + 13  # above the 1 MiB from which one stream keeps a record
SMALL = 64 * 1024 + 5  # a LoRA: below it, no record
QUICK = replace(FILE_RETRY, attempts=6, backoff_min_s=0.001, backoff_max_s=0.001)
ONE_STREAM = {"parallel_min_bytes": 1 << 40, "range_bytes": MiB}


def scripted(*faults: tuple[FaultKind, int, int | None]) -> FaultPlan:
    return FaultPlan(script=tuple(ScriptedFault(route=Route.DOWNLOAD, kind=k, nth=n, arg=a) for k, n, a in faults))


def stored(sim: Simulator, *, lora: bool = False) -> Artifact:
    """A checkpoint (or its LoRA) the simulator's storage serves, with a freshly signed URL."""
    body = {
        "instance_prompt": "p",
        "image_urls": ["https://x/a.jpg"],
        "base_model": "stable-diffusion-v1-5",
        "extract_lora": "original" if lora else "disabled",
    }
    job = sim.service.submit(JobKind.DREAMBOOTH, body, sim.now())
    ckp = next(c for c in job.checkpoints if c.is_lora == lora)
    assert ckp.file.content is not None
    return Artifact(
        name="model.safetensors",
        kind=ArtifactKind.LORA if lora else ArtifactKind.CHECKPOINT,
        remote_id=ckp.checkpoint_id,
        url=sim.renderer.url(ckp.file, sim.now()),
        size_bytes=ckp.file.content.size,
    )


def expected_sha(sim: Simulator, artifact: Artifact) -> str:
    """The sha256 of the bytes the simulator made for this file (its URL: .../<job id>/<name>?...)."""
    job_id, name = urlsplit(artifact.url).path.split("/")[-2:]
    return sim.expected_files(job_id)[name]


def served(sim: Simulator) -> list[tuple[int, int, str | None]]:
    return [(d.start, d.status, d.fault) for d in sim.ledger.downloads]


async def fetch(
    downloader: Downloader, artifact: Artifact, folder: Path, log: PartLog, *, renew: Artifact | None = None
) -> Path:
    async def again() -> Artifact:
        return renew or artifact

    with anyio.fail_after(30):
        got = await downloader.fetch(artifact, folder, again, log, renew_margin_s=0.0)
    return got.path


def one_stream(retry: RetryPolicy = QUICK, **more: int) -> Downloader:
    return Downloader(file_retry=retry, **{**ONE_STREAM, **more})  # type: ignore[arg-type]


def parts_in(folder: Path) -> list[Path]:
    return list(folder.glob("*.part"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_part_proven_to_its_last_byte_is_placed_without_a_request(tmp_path: Path) -> None:
    """Killed between verifying and renaming: the rerun checks the part and places it."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        log = MemoryPartLog()
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, tmp_path, log)
            final.rename(final.with_name(final.name + ".part"))  # as if killed before the rename
            before = served(sim)
            again = await fetch(downloader, artifact, tmp_path, log)
        assert served(sim) == before  # no byte asked for again
        assert again == final and sha(final) == expected_sha(sim, artifact)
    assert parts_in(tmp_path) == []


async def test_a_file_sent_whole_after_its_range_was_ignored_is_proven_whole(tmp_path: Path) -> None:
    """Broken mid-way; the resume meets a storage that ignores `Range` and sends it all: every
    byte of that 200 is proven for the file's size, so a kill before the rename costs no request."""
    plan = scripted((FaultKind.RESET, 1, 1_500_000), (FaultKind.IGNORE_RANGE, 2, None))
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, faults=plan)) as sim:
        artifact = stored(sim)
        log = MemoryPartLog()
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, tmp_path, log)
            assert [(s > 0, status, f) for s, status, f in served(sim)] == [
                (False, 200, "reset"),
                (False, 200, "ignore-range"),
            ]
            final.rename(final.with_name(final.name + ".part"))
            await fetch(downloader, artifact, tmp_path, log)
        assert len(served(sim)) == 2
        assert sha(final) == expected_sha(sim, artifact)


async def test_a_leftover_part_that_proves_nothing_is_fetched_from_its_first_byte(tmp_path: Path) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        artifact = stored(sim)
        (tmp_path / "model.safetensors.part").write_bytes(b"\xff" * (2 * MiB))  # no record: no byte is trusted
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, tmp_path, MemoryPartLog())
        assert served(sim) == [(0, 200, None)]
        assert sha(final) == expected_sha(sim, artifact)


async def test_a_resume_broken_before_its_first_byte_keeps_the_proven_prefix(tmp_path: Path) -> None:
    """A 206 whose body breaks at once adds nothing and takes nothing away: the next attempt
    resumes from the same proven byte."""
    plan = scripted((FaultKind.RESET, 1, 1_500_000), (FaultKind.RESET, 2, 0))
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, faults=plan)) as sim:
        artifact = stored(sim)
        async with one_stream() as downloader:
            final = await fetch(downloader, artifact, tmp_path, MemoryPartLog())
        got = served(sim)
        assert sha(final) == expected_sha(sim, artifact)
    assert [(status, f) for _, status, f in got] == [(200, "reset"), (206, "reset"), (206, None)]
    assert 0 < got[1][0] == got[2][0] <= 1_500_000


@pytest.mark.parametrize(
    "path",
    [
        pytest.param({**ONE_STREAM, "parallel_min_bytes": 1 << 40}, id="one-stream-resumed"),
        pytest.param({"parallel_min_bytes": MiB, "range_bytes": MiB, "connections_per_file": 2}, id="ranges"),
    ],
)
async def test_progress_counts_every_byte_of_the_file_once(tmp_path: Path, path: dict[str, int]) -> None:
    """What the progress display adds up: a file fetched is its size, whatever way it came."""
    plan = scripted((FaultKind.RESET, 1, SIZE - 300_000))  # the resume's body is shorter than one block
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, faults=plan)) as sim:
        artifact = stored(sim)
        async with Downloader(file_retry=QUICK, range_retry=QUICK, **path) as downloader:  # type: ignore[arg-type]
            await fetch(downloader, artifact, tmp_path, MemoryPartLog())
            assert downloader.bytes_fetched == SIZE
            assert downloader.transfers == {}


async def test_a_stop_mid_stream_keeps_and_proves_every_byte_received(tmp_path: Path) -> None:
    """Cancelled (Ctrl-C, a stop) while the body streams in: what arrived is written and proven."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, download_bytes_per_s=4 * MiB)) as sim:
        artifact = stored(sim)
        log = MemoryPartLog()
        async with one_stream(range_bytes=64 * MiB) as downloader:  # no proof mid-way: only the one at the stop
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fetch, downloader, artifact, tmp_path, log)
                    await until(lambda: downloader.bytes_fetched >= MiB)
                    tg.cancel_scope.cancel()
        record = await log.record()
    part = tmp_path / "model.safetensors.part"
    assert record is not None and MiB <= record.prefix() < SIZE
    assert record.prefix() == part.stat().st_size  # every byte on disk is proven, and no more


async def test_one_stream_proves_its_bytes_every_range_on_the_way(tmp_path: Path) -> None:
    """Proven mid-way, every `range_bytes` (so a SIGKILL loses at most one range), not after each block."""
    size = 7 * MiB + 7
    range_bytes = 2 * MiB
    async with Simulator(fast_sim(checkpoint_bytes=size, download_bytes_per_s=10 * MiB)) as sim:
        artifact = stored(sim)
        log = MemoryPartLog()
        seen: list[int] = []

        async def watch() -> None:
            while True:
                record = await log.record()
                prefix = record.prefix() if record is not None else 0
                if prefix and (not seen or seen[-1] != prefix):
                    seen.append(prefix)
                await anyio.sleep(0.002)

        async with one_stream(range_bytes=range_bytes) as downloader:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await fetch(downloader, artifact, tmp_path, log)
                tg.cancel_scope.cancel()
    mid_way = [p for p in seen if p < size]
    assert mid_way, seen  # proven before the end
    assert all(b - a >= range_bytes for a, b in itertools.pairwise(mid_way)), seen


async def test_an_object_of_another_size_than_the_job_says_is_not_resumed(tmp_path: Path) -> None:
    """Storage gave no ETag to compare: the total in its Content-Range is what tells."""
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        real = stored(sim)
        async with one_stream() as downloader:
            whole = await fetch(downloader, real, tmp_path / "first", MemoryPartLog())
        said = replace(real, size_bytes=SIZE + 100)  # the job says 100 bytes more than storage has
        part = tmp_path / "model.safetensors.part"
        part.write_bytes(whole.read_bytes()[:MiB])
        log = MemoryPartLog()
        await log.start_over(said.size_bytes)
        await log.prove(0, MiB)  # proven, with no ETag recorded
        async with one_stream(replace(QUICK, attempts=1)) as downloader:
            with pytest.raises(DownloadError, match=f"storage now has {SIZE} bytes, the job says {SIZE + 100}"):
                await fetch(downloader, said, tmp_path, log)
        record = await log.record()
    assert not part.exists()  # those bytes belong to another object
    assert record is not None and record.spans == ()


async def test_a_small_file_keeps_no_proven_spans_in_the_store(tmp_path: Path) -> None:
    """Below 1 MiB one stream keeps no record: a broken LoRA leaves nothing in the state store."""
    plan = scripted((FaultKind.RESET, 1, 30_000))
    state = tmp_path / "state.db"
    async with Simulator(fast_sim(faults=plan)) as sim:
        artifact = stored(sim, lora=True)
        assert artifact.size_bytes == SMALL
        store = await SqliteStore.open(state)
        try:
            async with one_stream(replace(QUICK, attempts=1)) as downloader:
                with pytest.raises(DownloadError, match="transfer broke"):
                    await fetch(downloader, artifact, tmp_path / "out", StorePartLog(store, "t0", artifact.remote_id))
        finally:
            await store.close()
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT count(*) FROM part_spans").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM part_objects").fetchone() == (0,)


async def test_storage_refusing_every_fresh_url_is_renewed_exactly_max_renewals_times(tmp_path: Path) -> None:
    async with Simulator(fast_sim(checkpoint_bytes=SIZE)) as sim:
        good = stored(sim)
        refused = replace(good, url=good.url[:-4] + "0000")  # a signature storage refuses (403)
        renewals = 0

        async def renew() -> Artifact:
            nonlocal renewals
            renewals += 1
            return refused

        async with one_stream() as downloader:
            with anyio.fail_after(30), pytest.raises(DownloadError) as caught:
                await downloader.fetch(refused, tmp_path, renew, MemoryPartLog(), renew_margin_s=0.0)
        tried = sim.ledger.requests[Route.DOWNLOAD]
    assert renewals == MAX_RENEWALS == 3
    assert tried == QUICK.attempts
    assert "gave up after 6 attempts" in str(caught.value) and "keeps refusing" in str(caught.value)


def io_threads() -> set[int]:
    """Threads that may touch files: the downloads' pool, and anyio's (the loop's own resolve host names)."""
    names = ("dreamlook-io", "AnyIO worker thread")
    return {t.ident or 0 for t in threading.enumerate() if t.name.startswith(names)}


async def test_disk_work_of_many_connections_stays_on_a_few_threads(tmp_path: Path) -> None:
    """Writes, syncs and hashes of a file in 17 ranges over 16 connections share the downloader's
    few I/O threads (each more thread only adds memory)."""
    size = 8 * MiB + 7
    async with Simulator(fast_sim(checkpoint_bytes=size)) as sim:
        artifact = stored(sim)
        before = io_threads()
        settings = {"parallel_min_bytes": MiB, "range_bytes": MiB // 2, "connections_per_file": 16}
        async with Downloader(file_retry=QUICK, **settings) as downloader:  # type: ignore[arg-type]
            final = await fetch(downloader, artifact, tmp_path, MemoryPartLog())
        assert sha(final) == expected_sha(sim, artifact)
        assert len(served(sim)) == 17
    assert len(io_threads() - before) <= IO_THREADS
