"""`job.json` and `SHA256SUMS` are written without a sync of their own, so a crash may leave
them missing, empty or stale: the store keeps what they hold, and a run that starts writes
them again, from the store alone (no API call a resume would not make, no download)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from orchestrator.models import JobState
from orchestrator.store import SqliteStore
from orchestrator.store.schema import MIGRATIONS, SCHEMA_V1
from tests.conftest import cli_process, fast_sim, write
from tests.test_store_contract import Opener, opener, synced  # noqa: F401 - opener is a fixture

JOBS = ["g0", "g1", "g2", "g3", "g4"]


def manifest(folder: Path) -> Path:
    lines = ["campaign: regen", "defaults:", "  image_gen: {num_samples: 2, width: 64, height: 64}", "jobs:"]
    lines += [f"- {{id: {j}, type: image_gen, base_model: stable-diffusion-v1-5, prompt: p {j}}}" for j in JOBS]
    return write(folder / "regen.yaml", "\n".join(lines) + "\n")


def run(path: Path, sim: Any, *extra: str) -> str:
    proc = cli_process(path, sim, *extra)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_run_writes_lost_or_changed_job_files_again_from_the_store(tmp_path: Path, threaded_sim: Any) -> None:
    path = manifest(tmp_path)
    out = tmp_path / "outputs" / "regen"
    with threaded_sim(fast_sim()) as sim:
        run(path, sim)
        before = snapshot(out)
        assert {k for k in before if k.endswith(("job.json", "SHA256SUMS"))} == {
            f"{j}/{n}" for j in JOBS for n in ("job.json", "SHA256SUMS")
        }
        inodes = {p: p.stat().st_ino for p in out.rglob("*.png")}
        (out / "g0" / "job.json").unlink()  # missing
        (out / "g1" / "SHA256SUMS").write_text("0" * 64 + "  nothing.png\n")  # changed
        (out / "g2" / "job.json").write_bytes(b"")  # what a crash after an unsynced rename may leave
        (out / "g2" / "SHA256SUMS").write_bytes(b"")
        asked = sim.ledger.requests.copy()

        said = run(path, sim)

        assert snapshot(out) == before  # every file as it was, byte for byte
        assert {p: p.stat().st_ino for p in out.rglob("*.png")} == inodes  # no result file written again
        assert sim.ledger.requests == asked  # nothing asked of the API: every job was done
        for job_id in ("g0", "g1", "g2"):
            assert f"job_id={job_id}" in said and "written again" in said
        assert "job_id=g3" not in said

        # A folder a person removed stays removed.
        for f in (out / "g4").iterdir():
            f.unlink()
        (out / "g4").rmdir()
        run(path, sim)
        assert not (out / "g4").exists()


@pytest.mark.anyio
async def test_the_store_keeps_a_finished_jobs_job_json(opener: Opener, tmp_path: Path) -> None:  # noqa: F811
    async with opener(tmp_path) as store:
        await synced(store)
        await store.record_intents([("b", "{}", "fp")], 1.0)
        await store.mark_submitted("b", "rb", 2.0)
        await store.move("b", JobState.RUNNING, 3.0)
        await store.record_success("b", checkpoint_id=None, files=[], remote_state="success", now=4.0)
        await store.move("b", JobState.DOWNLOADING, 5.0)
        assert await store.job_objects(["a", "b"]) == {}
        await store.move("b", JobState.DONE, 6.0, job_json='{"id": "rb"}\n')
        assert await store.job_objects(["a", "b", "nobody"]) == {"b": '{"id": "rb"}\n'}
        assert await store.job_objects([]) == {}


@pytest.mark.anyio
async def test_a_store_of_schema_3_gains_the_column_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        for script in (SCHEMA_V1, *MIGRATIONS[2], *MIGRATIONS[3]):
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('schema_version', '3'), ('campaign', 'c')")
        db.execute(
            "INSERT INTO jobs (id, type, state, fingerprint, updated_at, position)"
            " VALUES ('a', 'image_gen', 'done', 'f', 0, 0)"
        )
    store = await SqliteStore.open(path)
    assert (await store.job("a")).state is JobState.DONE
    assert await store.job_objects(["a"]) == {}
    await store.close()


def test_job_files_that_cannot_be_written_again_are_said_and_the_next_run_writes_them(
    tmp_path: Path, threaded_sim: Any
) -> None:
    path = manifest(tmp_path)
    out = tmp_path / "outputs" / "regen"
    with threaded_sim(fast_sim()) as sim:
        run(path, sim)
        before = snapshot(out)
        (out / "g3" / "job.json").unlink()
        (out / "g3" / "job.json").mkdir()  # in the way: job.json cannot be put in place
        proc = cli_process(path, sim)
        said, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, said  # every job is done: said, and the run went on (no crash)
        assert "cannot write" in said and "g3/job.json" in said and "the next run does" in said
        (out / "g3" / "job.json").rmdir()
        run(path, sim)
        assert snapshot(out) == before
