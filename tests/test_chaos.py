"""Chaos: a campaign against a faulty simulator, killed with SIGKILL at random moments
and restarted each time. At the end nothing was paid twice, nothing was lost, no part
file sits under a final name, nothing is left `submitting`, and unknowns are reported.

`make test` runs the quick version; `make chaos` the long ones (marked slow).
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orchestrator.sim import FaultPlan, FaultRates

from .campaigns import mixed_manifest
from .conftest import cli_process, fast_sim

ROOT = Path(__file__).resolve().parent.parent
FINISHED = "('done', 'failed', 'invalid', 'unknown', 'lost', 'skipped')"
RESULTS = ROOT / "bench" / "chaos-results.json"  # written by `make chaos` only
RATES = FaultRates(
    server_error=0.05,
    rate_limited=0.05,
    retry_after_share=0.5,
    slow=0.01,
    ghost_submit=0.05,
    ghost_5xx=0.03,
    reset_download=0.08,
    truncate_download=0.04,
    job_failure=0.03,
)


def _cli(manifest: Path, sim: Any) -> subprocess.Popen[str]:
    return cli_process(
        manifest,
        sim,
        "--max-active",
        "25",
        "--submit-rate",
        "200",
        "--requests-per-s",
        "1000",
        "--api-timeout",
        "0.5",
        "--log-format",
        "json",
        "-q",
        capture=False,
    )


def chaos(
    tmp_path: Path,
    threaded_sim: Any,
    *,
    trainings: int,
    combined: int,
    images: int,
    kills: int,
    seed: int,
    tags_listed: bool = True,
    progress_per_kill: tuple[int, int] = (3, 40),
) -> dict[str, Any]:
    manifest = mixed_manifest(tmp_path, trainings=trainings, combined=combined, plain_images=images)
    job_ids = [f"t{i:03d}" for i in range(trainings)] + [f"t{i:03d}-img" for i in range(trainings)]
    job_ids += [f"c{i:03d}" for i in range(combined)] + [f"g{i:03d}" for i in range(images)]
    rng = random.Random(seed)
    settings = fast_sim(
        seed=seed, retention_s=1e9, list_echoes_tags=tags_listed, faults=FaultPlan(rates=RATES, slow_s=1.0)
    )
    survived = 0
    state = tmp_path / ".dreamlook-batch" / "mixed.db"
    with threaded_sim(settings) as sim:
        for _ in range(kills):
            # Kill after the run has made a random amount of progress, counted in requests the
            # simulator served (not after a time, which would depend on the machine's speed).
            start = sum(sim.ledger.requests.values())
            target = start + rng.randint(*progress_per_kill)
            run = _cli(manifest, sim)
            deadline = time.monotonic() + 60
            while run.poll() is None and sum(sim.ledger.requests.values()) < target:
                assert time.monotonic() < deadline, "the run made no progress for 60 s"
                time.sleep(0.002)
            if run.poll() is None:
                run.kill()
            run.wait(30)
            with sqlite3.connect(state) as db:
                left = db.execute(f"SELECT COUNT(*) FROM jobs WHERE state NOT IN {FINISHED}").fetchone()[0]
            survived += run.returncode == -9 and left > 0  # killed in the middle, with work left
        finals = []
        for _ in range(8):  # then let it finish (a run may end early on a transient failure)
            run = _cli(manifest, sim)
            finals.append(run.wait(180))
            with sqlite3.connect(state) as db:
                open_jobs = db.execute(f"SELECT COUNT(*) FROM jobs WHERE state NOT IN {FINISHED}").fetchone()[0]
            if open_jobs == 0:
                break
        with sqlite3.connect(tmp_path / ".dreamlook-batch" / "mixed.db") as db:
            rows = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, state, reason FROM jobs")}
        tags = sim.ledger.tag_values()
        remote_of: dict[str, str] = {}
        for entry in sim.ledger.jobs:
            value = next(t["value"] for t in entry.tags if t["key"] == "dreamlook-batch")
            remote_of.setdefault(value, entry.job_id)  # the first one made is ours
        expected = {j: sim.expected_files(remote_of[f"mixed/{j}"]) for j in job_ids if rows[j][0] == "done"}
        faults = Counter(d.fault for d in sim.ledger.downloads if d.fault)
        submit_requests = sim.ledger.requests["submit"]
    states = Counter(state for state, _ in rows.values())
    duplicates = sum(n - 1 for n in tags.values() if n > 1)
    out = tmp_path / "outputs" / "mixed"

    # Each manifest job at most once in the ledger; exactly once where it succeeded.
    assert duplicates == 0, {k: n for k, n in tags.items() if n > 1}
    for job in job_ids:
        state, reason = rows[job]
        if state in ("done", "failed", "lost"):
            assert tags[f"mixed/{job}"] == 1, job
        if state == "unknown":
            assert reason, f"{job} is unknown without a reason for the user"
    assert states["submitting"] == 0 and open_jobs == 0, states
    # Every successful job's files are on disk, byte-identical to the simulator's.
    for job, files in expected.items():
        sums = {
            name: digest
            for digest, name in (line.split("  ", 1) for line in (out / job / "SHA256SUMS").read_text().splitlines())
        }
        assert sums and all(files[name] == digest for name, digest in sums.items()), job
        for name, digest in sums.items():
            assert hashlib.sha256((out / job / name).read_bytes()).hexdigest() == digest, f"{job}/{name}"
    # No .part file under a final name; none left at all once jobs are finished.
    assert not list(out.rglob("*.part"))
    report = {
        "jobs": len(job_ids),
        "kills_survived": survived,
        "duplicates": duplicates,
        "states": dict(states),
        "final_exit_codes": finals,
        "submit_requests": submit_requests,
        "download_faults": dict(faults),
        "tags_listed": tags_listed,
    }
    print(json.dumps(report))
    return report


def _record(name: str, report: dict[str, Any]) -> None:
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous[name] = report
    RESULTS.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


def test_chaos_quick(tmp_path: Path, threaded_sim: Any) -> None:
    # 8 kills after at most 12 requests each: far fewer than the campaign needs (28 submissions,
    # their checks, 60 downloads), so every kill lands in the middle of it, on any machine.
    report = chaos(
        tmp_path, threaded_sim, trainings=8, combined=4, images=8, kills=8, seed=1, progress_per_kill=(3, 12)
    )
    assert report["kills_survived"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("tags_listed", [True, False], ids=["list-has-tags", "list-without-tags"])
def test_chaos_long(tmp_path: Path, threaded_sim: Any, tags_listed: bool) -> None:
    report = chaos(
        tmp_path, threaded_sim, trainings=60, combined=30, images=90, kills=40, seed=7, tags_listed=tags_listed
    )
    _record(f"long-{'tags' if tags_listed else 'no-tags'}", report)
