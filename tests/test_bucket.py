"""`--out s3://bucket/prefix/`, as a user drives it, against a real S3 server on loopback
(moto) and the simulator: every file straight into the bucket with the simulator's bytes,
`job.json`/`SHA256SUMS`/`summary.json` beside them; a kill mid-upload resumed from the first
missing part; an object changed under an unfinished upload started over; a key already taken
never overwritten; a bucket that is missing refused before anything is paid for."""

from __future__ import annotations

import dataclasses
import json
import signal
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault
from orchestrator.store import SqliteStore
from orchestrator.transfer.bucket import Bucket, BucketUrl
from orchestrator.transfer.file import Downloader
from orchestrator.transfer.to_bucket import BucketFetcher, UploadLog

from .campaigns import mixed_manifest
from .conftest import cli_process, fast_sim, write
from .s3_server import S3, assert_campaign_in_bucket
from .test_store_contract import FILE, a_file_to_fetch, started

MiB = 1024 * 1024
BIG = 20 * MiB + 13  # three parts of 8 MiB: a multipart upload
PARTS = ("--range-mb", "8")


def one_training(folder: Path, *, lora: bool = False) -> Path:
    """One training; its checkpoint only (no LoRA), unless `lora`."""
    return write(
        folder / "one.yaml",
        "campaign: one\njobs:\n- id: t0\n  type: dreambooth\n  instance_prompt: photo of p\n"
        "  image_urls: [https://example.com/a.jpg]\n  base_model: stable-diffusion-v1-5\n"
        f"  extract_lora: {'original' if lora else 'disabled'}\n",
    )


def run(manifest: Path, sim: Any, s3: S3, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = cli_process(manifest, sim, "--out", s3.url(), *PARTS, *extra, env={**s3.env(), **(env or {})})
    out = proc.communicate(timeout=120)[0]
    return proc.returncode, out


def test_a_campaign_goes_straight_into_the_bucket(
    tmp_path: Path, threaded_sim: Any, s3: S3, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = mixed_manifest(tmp_path, trainings=2, combined=1, plain_images=2)
    job_ids = ["t000", "t001", "t000-img", "t001-img", "c000", "g000", "g001"]
    with threaded_sim(fast_sim(checkpoint_bytes=BIG, seed=4)) as sim:
        code, out = run(manifest, sim, s3)
        assert code == 0, out
        assert assert_campaign_in_bucket(sim, s3, "out/", "mixed", job_ids) >= 10
        assert s3.url() in out  # the end summary says where the files are
    summary = json.loads(s3.read("out/summary.json"))
    assert summary["done"] is True and {j["id"] for j in summary["jobs"]} == set(job_ids)
    assert not (tmp_path / "outputs").exists()  # nothing on local disk
    assert [k for k in s3.keys() if "write-check" in k] == []  # the destination check cleaned up
    where = ["--out", s3.url(), "--s3-endpoint-url", s3.endpoint]
    capsys.readouterr()
    assert main(["status", str(manifest), *where]) == 0
    assert f"files in {s3.url()}" in capsys.readouterr().out
    assert main(["report", str(manifest), *where]) == 0
    assert f"report: {s3.url()}report.html" in capsys.readouterr().out
    page = s3.read("out/report.html").decode()
    assert "t000" in page and s3.url() in page


def test_a_kill_mid_upload_resumes_from_the_first_missing_part(tmp_path: Path, threaded_sim: Any, s3: S3) -> None:
    manifest = one_training(tmp_path, lora=True)
    size = 6 * 8 * MiB + 13  # seven parts
    with threaded_sim(fast_sim(checkpoint_bytes=size, seed=2)) as sim:
        code, _ = run(
            manifest, sim, s3, "--connections-per-file", "1", env={"DREAMLOOK_BATCH_CRASH_AT": "part-uploaded:3"}
        )
        assert code == -signal.SIGKILL
        (open_upload,) = s3.open_uploads()
        assert open_upload not in s3.keys("out/t0/")  # the checkpoint is not visible before it is whole
        served = len(sim.ledger.downloads)
        code, out = run(manifest, sim, s3)
        assert code == 0, out
        assert_campaign_in_bucket(sim, s3, "out/", "one", ["t0"])
        resumed = [
            d for d in sim.ledger.downloads[served:] if d.path.endswith(".safetensors") and d.end - d.start > MiB
        ]
        assert resumed and min(d.start for d in resumed) == 3 * 8 * MiB  # parts 1-3 were not fetched again
        assert len(sim.ledger.jobs) == 1


def test_an_object_changed_under_an_unfinished_upload_starts_it_over(tmp_path: Path, threaded_sim: Any, s3: S3) -> None:
    manifest = one_training(tmp_path)
    # Storage gives no hash (hash_max_bytes=0, crc32c=False): only the ETag can tell the new generation.
    with threaded_sim(fast_sim(checkpoint_bytes=BIG, seed=3, hash_max_bytes=0, crc32c=False)) as sim:
        code, _ = run(
            manifest, sim, s3, "--connections-per-file", "1", env={"DREAMLOOK_BATCH_CRASH_AT": "part-uploaded:1"}
        )
        assert code == -signal.SIGKILL
        (path,) = {d.path for d in sim.ledger.downloads}
        sim.service.generations[path] += 1  # the service rewrites the checkpoint (same size, other bytes)
        code, out = run(manifest, sim, s3)
        assert code == 0, out
        assert_campaign_in_bucket(sim, s3, "out/", "one", ["t0"])  # the new bytes, whole


@pytest.mark.parametrize("size", [BIG, MiB + 7], ids=["multipart", "one-put"])
def test_a_key_already_taken_is_never_overwritten(tmp_path: Path, threaded_sim: Any, s3: S3, size: int) -> None:
    manifest = one_training(tmp_path)
    with threaded_sim(fast_sim(checkpoint_bytes=size, seed=5)) as sim:
        code, out = run(manifest, sim, s3)
        assert code == 0, out
        names = [k for k in s3.keys("out/t0/") if k.endswith(".safetensors")]
        # Another state (a lost state file, say) fetches the same files again: the objects are ours, kept.
        code, out = run(manifest, sim, s3, "--state", str(tmp_path / "other.db"))
        assert code == 0, out
        assert_campaign_in_bucket(sim, s3, "out/", "one", ["t0"])
        # A third finds another object under one of the keys: left alone, said plainly.
        s3.client().delete_object(Bucket=s3.bucket, Key=names[0])
        s3.client().put_object(Bucket=s3.bucket, Key=names[0], Body=b"someone else's file")
        code, out = run(manifest, sim, s3, "--state", str(tmp_path / "third.db"))
        assert code == 1, out
        assert "already holds another object" in out and "left alone" in out
        assert out.count("already holds another object") <= 3  # said, not tried again round after round
        assert s3.read(names[0]) == b"someone else's file"
        assert s3.open_uploads() == []
        assert len(sim.ledger.jobs) == 1


def test_a_missing_bucket_is_refused_before_anything_is_paid_for(
    tmp_path: Path, threaded_sim: Any, s3: S3, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = one_training(tmp_path)
    with threaded_sim(fast_sim()) as sim:
        proc = cli_process(manifest, sim, "--out", f"s3://no-such-bucket-{sim.api_key[:6].lower()}/x/", env=s3.env())
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 2, out
        assert "no such bucket" in out and "Nothing was sent" in out
        assert sim.ledger.jobs == []
        assert "testing" not in out  # no credential in the message
    capsys.readouterr()
    code = main(["plan", str(manifest), "--out", "s3://no-such-bucket-at-all/x/", "--s3-endpoint-url", s3.endpoint])
    assert code == 2 and "no such bucket" in capsys.readouterr().err


@pytest.mark.parametrize("size", [BIG, MiB + 7], ids=["multipart", "one-put"])
def test_wrong_bytes_of_the_right_length_never_reach_the_bucket(
    tmp_path: Path, threaded_sim: Any, s3: S3, size: int
) -> None:
    """Only storage's md5: a body of the right length whose second half is wrong."""
    garble = ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.GARBLE, nth=1, arg=100_000)
    with threaded_sim(fast_sim(checkpoint_bytes=size, seed=6, faults=FaultPlan(script=(garble,)))) as sim:
        code, out = run(one_training(tmp_path), sim, s3)
        assert code == 0, out
        assert [d.fault for d in sim.ledger.downloads].count("garble") == 1
        assert_campaign_in_bucket(sim, s3, "out/", "one", ["t0"])


@pytest.mark.parametrize("size", [BIG, MiB + 7], ids=["multipart", "one-put"])
def test_a_broken_safetensors_header_is_never_made_visible(
    tmp_path: Path, threaded_sim: Any, s3: S3, size: int
) -> None:
    """Only the header check: right size, and storage's md5 is of the broken object itself."""
    broken = ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.CORRUPT_HEADER, nth=1)
    with threaded_sim(fast_sim(checkpoint_bytes=size, seed=7, faults=FaultPlan(script=(broken,)))) as sim:
        code, out = run(one_training(tmp_path), sim, s3)
        assert sim.service.corrupt
        assert code == 1, out
        assert "safetensors header" in out
        corrupt = next(iter(sim.service.corrupt)).rsplit("/", 1)[-1]
        assert f"out/t0/{corrupt}" not in s3.keys("out/")
        assert s3.open_uploads() == []  # its upload was aborted


@pytest.mark.parametrize("size", [BIG, MiB + 7], ids=["multipart", "one-put"])
def test_an_object_shorter_than_the_job_says_is_never_made_visible(
    tmp_path: Path, threaded_sim: Any, s3: S3, size: int
) -> None:
    """Only the size check: the object is a whole, consistent safetensors file with its own md5."""
    shorter = ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.REWRITE, nth=1, arg=-4096)
    with threaded_sim(fast_sim(checkpoint_bytes=size, seed=8, faults=FaultPlan(script=(shorter,)))) as sim:
        code, out = run(one_training(tmp_path), sim, s3)
        assert sim.service.resized
        assert code == 1, out
        assert str(size) in out, out  # the size the job says, in the reason
        assert [k for k in s3.keys("out/") if k.endswith(".safetensors")] == []
        assert s3.open_uploads() == []


def auth(s3: S3, after_requests: bytes) -> None:
    """moto's signature checks: on after this many requests ("0": now; "inf": never)."""
    ask = urllib.request.Request(
        f"{s3.endpoint}/moto-api/reset-auth", data=after_requests, headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(ask) as answer:
        assert answer.status == 200


def test_credentials_the_bucket_refuses_stop_the_run_before_anything_is_paid_for(
    tmp_path: Path, threaded_sim: Any, s3: S3
) -> None:
    """moto checks signatures once asked to (`/moto-api/reset-auth`): a wrong secret is refused
    by the destination check, with exit code 2, and no part of any credential in the output."""
    secret = "wrong-secret-Zq81"
    auth(s3, b"0")
    try:
        with threaded_sim(fast_sim()) as sim:
            env = {**s3.env(), "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKEFAKE", "AWS_SECRET_ACCESS_KEY": secret}
            proc = cli_process(one_training(tmp_path), sim, "--out", s3.url(), env=env)
            out = proc.communicate(timeout=60)[0]
            assert proc.returncode == 2, out
            assert "access denied" in out and "Nothing was sent" in out
            assert sim.ledger.jobs == []
            assert secret not in out and "AKIAFAKE" not in out
    finally:
        auth(s3, b"inf")


def test_a_file_the_service_deleted_mid_upload_has_its_upload_aborted(
    tmp_path: Path, threaded_sim: Any, s3: S3
) -> None:
    """Killed mid-upload, and the service deletes the file before the next run: the job is lost,
    said so, and the upload's parts are not left in the bucket to be paid for."""
    manifest = one_training(tmp_path)
    with threaded_sim(fast_sim(checkpoint_bytes=BIG, seed=9)) as sim:
        code, _ = run(
            manifest, sim, s3, "--connections-per-file", "1", env={"DREAMLOOK_BATCH_CRASH_AT": "part-uploaded:1"}
        )
        assert code == -signal.SIGKILL
        assert len(s3.open_uploads()) == 1
        (path,) = {d.path for d in sim.ledger.downloads}
        for job in sim.service.jobs.values():
            for checkpoint in job.checkpoints:
                if checkpoint.file.path == path:  # gone: storage answers 404
                    checkpoint.file = dataclasses.replace(checkpoint.file, deleted_at=0.0)
        code, out = run(manifest, sim, s3)
        assert code == 1, out
        assert "lost" in out
        assert s3.open_uploads() == []
        assert [k for k in s3.keys("out/") if k.endswith(".safetensors")] == []


@pytest.mark.anyio
async def test_an_upload_the_bucket_will_not_abort_stays_on_record(tmp_path: Path, s3: S3) -> None:
    """Aborting fails (the bucket is gone): no error escapes, and the upload stays on record, so
    nothing claims it was cleaned up (the README's lifecycle rule is the second net)."""
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        await a_file_to_fetch(store)
        await started(store)
        async with Bucket(BucketUrl.parse("s3://no-such-bucket-left/out/"), endpoint_url=s3.endpoint) as bucket:
            async with Downloader() as downloader:
                await BucketFetcher(bucket, downloader).abandon(UploadLog(store, "a", FILE))
        assert await store.upload_record("a", FILE) is not None
    finally:
        await store.close()


def test_a_resume_with_every_part_in_the_bucket_still_checks_storages_md5(
    tmp_path: Path, threaded_sim: Any, s3: S3
) -> None:
    """Wrong bytes of the right length, every part uploaded and recorded, then a kill before the
    upload completes: the rerun asks storage for its md5 (no part is fetched again), finds the
    bytes wrong, and starts the file over. Nothing wrong ever becomes visible."""
    manifest = one_training(tmp_path)
    garble = ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.GARBLE, nth=1, arg=100_000)
    with threaded_sim(fast_sim(checkpoint_bytes=BIG, seed=12, faults=FaultPlan(script=(garble,)))) as sim:
        crash = {"DREAMLOOK_BATCH_CRASH_AT": "part-uploaded:3"}
        code, _ = run(manifest, sim, s3, "--connections-per-file", "1", env=crash)
        assert code == -signal.SIGKILL
        code, out = run(manifest, sim, s3)
        assert code == 0, out
        assert_campaign_in_bucket(sim, s3, "out/", "one", ["t0"])


def test_a_part_after_a_gap_is_kept_only_if_its_bytes_are_the_same(tmp_path: Path, threaded_sim: Any, s3: S3) -> None:
    """Part 3 came garbled and its upload finished before part 2's (here: part 2's record is
    gone); the rerun reads parts 2 and 3 again, finds part 3's bytes differ from what the bucket
    holds, and uploads it again rather than completing with the garbled one."""
    manifest = one_training(tmp_path)
    garble = ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.GARBLE, nth=1, arg=2 * 8 * MiB + 100)
    with threaded_sim(fast_sim(checkpoint_bytes=BIG, seed=13, faults=FaultPlan(script=(garble,)))) as sim:
        crash = {"DREAMLOOK_BATCH_CRASH_AT": "part-uploaded:3"}
        code, _ = run(manifest, sim, s3, "--connections-per-file", "1", env=crash)
        assert code == -signal.SIGKILL
        state = tmp_path / ".dreamlook-batch" / "one.db"
        with sqlite3.connect(state) as db:
            assert db.execute("DELETE FROM upload_parts WHERE number = 2").rowcount == 1
        code, out = run(manifest, sim, s3)
        assert code == 0, out
        assert_campaign_in_bucket(sim, s3, "out/", "one", ["t0"])
