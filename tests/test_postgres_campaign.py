"""A campaign kept in PostgreSQL, as a user drives it: `run MANIFEST --state postgresql://...`
loads and runs it; another process joins with `--campaign NAME` and no manifest;
`DREAMLOOK_BATCH_STATE` stands for `--state`; a second runner of one campaign is refused
while the first holds it (exit 4, naming it); the mistakes are said plainly (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.cli import main

from .campaigns import assert_campaign_on_disk, mixed_manifest
from .conftest import FAST_CLI, cli_process, fast_sim

pytestmark = pytest.mark.anyio


def test_a_campaign_runs_in_postgresql_and_a_host_without_the_manifest_joins_it(
    tmp_path: Path, pg_url: str, threaded_sim: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = mixed_manifest(tmp_path, trainings=6, combined=4, plain_images=6)
    job_ids = [*(f"t{i:03d}" for i in range(6)), *(f"t{i:03d}-img" for i in range(6))]
    job_ids += [*(f"c{i:03d}" for i in range(4)), *(f"g{i:03d}" for i in range(6))]
    out = tmp_path / "out"
    with threaded_sim(fast_sim(seed=5)) as sim:
        first = cli_process(manifest, sim, "--state", pg_url, "--out", str(out))
        said = first.communicate(timeout=120)[0]
        assert first.returncode == 0, said
        assert_campaign_on_disk(sim, out, "mixed", job_ids)
        assert not (tmp_path / ".dreamlook-batch").exists()  # no SQLite file beside the manifest
        # Another host: no manifest, the state from the environment; nothing is paid again.
        args = [sys.executable, "-m", "orchestrator", "run", "--campaign", "mixed", "--out", str(out)]
        env = {**os.environ, "DREAMLOOK_API_KEY": sim.api_key, "DREAMLOOK_BATCH_STATE": pg_url}
        joined = subprocess.run(
            [*args, "--api-url", sim.url, *FAST_CLI], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert len(sim.ledger.jobs) == len(job_ids)
    monkeypatch.setenv("DREAMLOOK_BATCH_STATE", pg_url)
    capsys.readouterr()
    assert main(["status", "--campaign", "mixed", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {j["id"] for j in record["jobs"]} == set(job_ids)
    assert {j["state"] for j in record["jobs"]} == {"done"}
    with psycopg.connect(pg_url) as db:
        spec = db.execute("SELECT spec FROM dlb_jobs WHERE campaign='mixed' AND id='t000-img'").fetchone()
    assert spec is not None and json.loads(spec[0])["checkpoint_from"] == "t000"


def test_three_workers_share_a_campaign_and_pay_for_each_job_once(
    tmp_path: Path, pg_url: str, threaded_sim: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three `run` processes at once on one campaign: each takes a share of the jobs, none is
    paid twice, one at a time reads the job lists, and every file is on disk (one folder: the
    workers of one host)."""
    manifest = mixed_manifest(tmp_path, trainings=8, combined=4, plain_images=8)
    job_ids = [*(f"t{i:03d}" for i in range(8)), *(f"t{i:03d}-img" for i in range(8))]
    job_ids += [*(f"c{i:03d}" for i in range(4)), *(f"g{i:03d}" for i in range(8))]
    out = tmp_path / "out"
    with threaded_sim(fast_sim(seed=9, time_scale=2000.0)) as sim:
        workers = [
            cli_process(manifest, sim, "--state", pg_url, "--out", str(out), "--max-active", "6") for _ in range(3)
        ]
        said = [w.communicate(timeout=180)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0, 0], said
        assert_campaign_on_disk(sim, out, "mixed", job_ids)
        # One worker at a time reads the job lists: the reading passes on only when its reader
        # stops, so the readers of the list requests, in order, change at most twice.
        readers = [ua for i, ua in enumerate(sim.ledger.list_readers) if i == 0 or ua != sim.ledger.list_readers[i - 1]]
        assert sim.ledger.list_readers and len(readers) <= 3, readers
        assert {ua.rsplit("pid ", 1)[-1].rstrip(")") for ua in readers} <= {str(w.pid) for w in workers}
    with psycopg.connect(pg_url) as db:
        owners = db.execute("SELECT count(DISTINCT id) FROM dlb_workers WHERE campaign='mixed'").fetchone()
        leftover = db.execute("SELECT count(*) FROM dlb_jobs WHERE lease_owner IS NOT NULL").fetchone()
    assert owners == (3,) and leftover == (0,)  # each registered; all handed back at the end
    assert not list(out.rglob("*.part"))
    capsys.readouterr()
    assert main(["status", str(manifest), "--state", pg_url]) == 0
    table = " ".join(capsys.readouterr().out.split())
    assert "3 workers seen in the last day, 0 not stopped" in table
    assert str(workers[0].pid) in table


def test_mistakes_with_the_state_are_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = mixed_manifest(tmp_path, trainings=1, combined=0, plain_images=0)
    assert main(["status", "--campaign", "mixed", "--state", str(tmp_path / "x.db")]) == 2
    assert "joins a campaign kept in PostgreSQL" in capsys.readouterr().err
    assert main(["status"]) == 2
    assert "give the MANIFEST, or --campaign NAME" in capsys.readouterr().err
    assert main(["status", str(manifest), "--campaign", "other"]) == 2
    assert "is campaign 'mixed'" in capsys.readouterr().err
    down = "postgresql://someone:hunter2@127.0.0.1:1/nothing"
    assert main(["status", str(manifest), "--state", down]) == 1
    said = capsys.readouterr().err
    assert "hunter2" not in said and "127.0.0.1:1/nothing" in said
    assert main(["run", str(manifest), "--state", down, "--api-url", "http://127.0.0.1:9"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "hunter2" not in said and "cannot open the state store" in said and "Nothing was sent" in said


def test_a_campaign_never_loaded_is_said_so(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--campaign", "nothing-here", "--state", pg_url]) == 1
    assert "no campaign 'nothing-here'" in capsys.readouterr().err


@pytest.mark.broad  # left out of `make mutants` (time): see bench/MUTANTS.md
def test_one_worker_at_a_time_reads_the_job_lists(tmp_path: Path, pg_url: str, threaded_sim: Any) -> None:
    """Trainings that take a while, submitted by three workers in turns (a slow shared submit
    rate), checked often: every reading of a job list comes from the worker that holds the
    reading; it passes on only when that worker stops, so the readers of the list requests,
    in order, change at most twice."""
    manifest = mixed_manifest(tmp_path, trainings=12, combined=0, plain_images=0)
    with threaded_sim(fast_sim(seed=3, time_scale=200.0)) as sim:
        workers = [
            cli_process(manifest, sim, "--state", pg_url, "--out", str(tmp_path / "out"), "--submit-rate", "20")
            for _ in range(3)
        ]
        said = [w.communicate(timeout=180)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0, 0], said
        reads = sim.ledger.list_readers
    changes = [ua for i, ua in enumerate(reads) if i == 0 or ua != reads[i - 1]]
    assert len(reads) >= 10 and len(changes) <= 3, changes


def test_max_new_jobs_holds_for_workers_that_start_together(tmp_path: Path, pg_url: str, threaded_sim: Any) -> None:
    """Two `run --max-new-jobs 3` at once on one campaign of 10 jobs: 3 jobs paid in all, not 6
    (the store checks the round's count in the transaction of each intent)."""
    lines = ["campaign: capped", "jobs:"]
    lines += [f"- {{id: j{i}, type: image_gen, prompt: p{i}, base_model: stable-diffusion-v1-5}}" for i in range(10)]
    manifest = tmp_path / "capped.yaml"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with threaded_sim(fast_sim(seed=11)) as sim:
        workers = [
            cli_process(
                manifest,
                sim,
                "--state",
                pg_url,
                "--out",
                str(tmp_path / "out"),
                "--max-new-jobs",
                "3",
                "--submit-rate",
                "2",
            )
            for _ in range(2)
        ]
        said = [w.communicate(timeout=120)[0] for w in workers]
        assert [w.returncode for w in workers] == [1, 1], said  # jobs left pending: exit 1, as on one machine
        assert len(sim.ledger.jobs) == 3, said
    with psycopg.connect(pg_url) as db:
        states = db.execute("SELECT state, count(*) FROM dlb_jobs WHERE campaign='capped' GROUP BY state").fetchall()
    assert dict(states) == {"pending": 7, "done": 3}, states
