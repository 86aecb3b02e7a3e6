"""`jobs download TYPE ID [--out DIR]` through the real command line against the simulator:
one job's files on disk with the simulator's bytes, `SHA256SUMS` and `job.json` beside them,
URLs renewed by a GET of the job, files already there kept, and plain refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.sim import FaultPlan, FaultRates, Simulator

from . import test_cli
from .conftest import fast_sim
from .simhttp import DB_BODY, IG_BODY, Http
from .test_cli import run


def made(sim: Simulator, kind: str, body: dict[str, Any], *, until: str = "success") -> str:
    """A job submitted as any API user would, outside any campaign; waited for until `until`."""

    async def submit() -> str:
        async with Http(sim) as http:
            job_id = await http.submit(kind, body)
            with anyio.fail_after(30):
                while (await http.job(kind, job_id))["state"] != until:  # noqa: ASYNC110 (as a user polls)
                    await anyio.sleep(0.01)
            return job_id

    return anyio.run(submit)


def sums_of(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


keyed = test_cli.keyed  # the command-line tests' fixture: the simulator's key and URL in the environment


def test_a_jobs_files_land_verified_with_sha256sums_and_job_json(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        job_id = made(sim, "dreambooth", {**DB_BODY, "extract_lora": "original"})
        gets = sim.ledger.requests["get"]
        folder = tmp_path / "models" / "alice"
        code, out, err = run(["jobs", "download", "dreambooth", job_id, "--out", str(folder)], capsys)
        assert code == 0, out + err
        expected = sim.expected_files(job_id)
        # The URLs live seconds at this time scale: each was renewed by a GET of the job first.
        assert sim.ledger.requests["get"] - gets > 1
        downloads = sim.ledger.requests["download"]
        assert len(expected) == 2  # the checkpoint and the LoRA
        assert sums_of(folder) == expected
        for name, digest in expected.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
            assert f"{name}: " in out and f"sha256 {digest}, verified" in out
        assert sorted(p.name for p in folder.iterdir()) == sorted([*expected, "SHA256SUMS", "job.json"])
        job = json.loads((folder / "job.json").read_text())
        assert job["job_id"] == job_id and "X-Goog-Signature" not in json.dumps(job)
        assert f"2 file(s) of dreambooth job {job_id} in {folder}, with job.json and SHA256SUMS" in out
        assert "X-Goog-Signature" not in out + err
        # Again: the files there are checked against SHA256SUMS and kept, not fetched again.
        code, out, _ = run(["jobs", "download", "dreambooth", job_id, "--out", str(folder)], capsys)
        assert code == 0 and out.count("already here") == 2
        assert sim.ledger.requests["download"] == downloads
        # A file whose bytes no longer match is fetched again.
        damaged = next(iter(expected))
        (folder / damaged).write_bytes(b"not the model")
        code, out, _ = run(["jobs", "download", "dreambooth", job_id, "--out", str(folder)], capsys)
        assert code == 0 and out.count("already here") == 1
        assert hashlib.sha256((folder / damaged).read_bytes()).hexdigest() == expected[damaged]
        assert sums_of(folder) == expected


def test_without_out_the_files_go_to_a_folder_named_after_the_job(
    tmp_path: Path, threaded_sim: Any, keyed: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        job_id = made(sim, "image_gen", IG_BODY)
        code, out, _ = run(["jobs", "download", "image-gen", job_id], capsys)
        expected = sim.expected_files(job_id)
    assert code == 0 and f"in {tmp_path / job_id}," in out
    assert len(expected) == 2 and sums_of(tmp_path / job_id) == expected


def test_refusals_are_plain_and_fetch_nothing(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim(faults=FaultPlan(rates=FaultRates(job_failure=1.0)))) as sim:
        keyed(sim)
        failed = made(sim, "image_gen", IG_BODY, until="failure")
        out_dir = tmp_path / "o"
        code, _, err = run(["jobs", "download", "image_gen", failed, "--out", str(out_dir)], capsys)
        assert code == 1 and f"image_gen job {failed} failed (" in err and "): it made no files" in err
        code, _, err = run(["jobs", "download", "image_gen", "ig_nope", "--out", str(out_dir)], capsys)
        assert code == 1 and "no such image_gen job ig_nope" in err
        code, _, err = run(["jobs", "download", "image_gen", failed, "--out", "s3://bucket/x"], capsys)
        assert code == 2 and "a local folder" in err
        assert sim.ledger.requests["download"] == 0
    assert not out_dir.exists()
    with threaded_sim(fast_sim(time_scale=1.0)) as sim:  # a training takes minutes here
        keyed(sim)
        running = made(sim, "dreambooth", DB_BODY, until="queued")
        code, _, err = run(["jobs", "download", "dreambooth", running, "--out", str(out_dir)], capsys)
        assert code == 1 and f"dreambooth job {running} is " in err and "nothing to download until it succeeds" in err
    assert not out_dir.exists()
