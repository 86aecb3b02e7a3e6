"""Several workers on one campaign in PostgreSQL, against a faulty simulator: killed with
SIGKILL at random moments and restarted, one frozen (SIGSTOP) past its lease. Afterwards
exactly one remote job per manifest job in the simulator's ledger, every remote id
recorded, nothing left `submitting`, and every file byte-identical to the simulator's.

The frozen-worker test is deterministic (the worker freezes itself right after recording
its intents, before its POSTs) and has a negative control: with the lease check before the
POST switched off, the woken worker sends what another worker already sent, and the ledger
shows the duplicate. `make test` runs the quick versions; `make chaos` the long one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.sim import FaultPlan, FaultRates

from .campaigns import assert_campaign_on_disk, mixed_manifest
from .conftest import cli_process, fast_sim

# A lease just longer than a POST's whole timeout (10 s to connect, 0.5 s to answer) plus 5 s.
WORKER = ["--lease-s", "16", "--api-timeout", "0.5", "--reconcile-grace", "0.5", "--log-format", "json", "-q"]
RATES = FaultRates(
    server_error=0.04,
    rate_limited=0.04,
    retry_after_share=0.5,
    ghost_submit=0.04,
    ghost_5xx=0.03,
    reset_download=0.06,
    truncate_download=0.03,
)


def worker(manifest: Path, sim: Any, pg_url: str, out: Path, **env: str) -> subprocess.Popen[str]:
    return cli_process(
        manifest, sim, "--state", pg_url, "--out", str(out), "--max-active", "12", *WORKER, env=env, capture=False
    )


def frozen(process: subprocess.Popen[str]) -> bool:
    """Has the process stopped itself (SIGSTOP)? Its state in /proc is T."""
    stat = Path(f"/proc/{process.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def job_ids(trainings: int, combined: int, images: int) -> list[str]:
    ids = [f"t{i:03d}" for i in range(trainings)] + [f"t{i:03d}-img" for i in range(trainings)]
    return ids + [f"c{i:03d}" for i in range(combined)] + [f"g{i:03d}" for i in range(images)]


def store_rows(pg_url: str) -> dict[str, tuple[str, str | None]]:
    with psycopg.connect(pg_url) as db:
        rows = db.execute("SELECT id, state, remote_id FROM dlb_jobs WHERE campaign='mixed'").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


@pytest.mark.parametrize("lease_check", ["on", "off"])
def test_a_frozen_worker_never_sends_what_another_took_over(
    tmp_path: Path, pg_url: str, threaded_sim: Any, lease_check: str
) -> None:
    manifest = mixed_manifest(tmp_path, trainings=0, combined=0, plain_images=8)
    out = tmp_path / "out"
    env = {"DREAMLOOK_BATCH_FREEZE_AT": "after-intent"}
    if lease_check == "off":
        env["DREAMLOOK_BATCH_UNSAFE_NO_LEASE_CHECK"] = "1"
    with threaded_sim(fast_sim(seed=4)) as sim:
        sleeper = worker(manifest, sim, pg_url, out, **env)
        wait_for(lambda: frozen(sleeper), 60, "the first worker to freeze after its intents")
        held = {j for j, (state, _) in store_rows(pg_url).items() if state == "submitting"}
        assert held and not sim.ledger.jobs  # intents recorded, nothing sent yet
        others = [worker(manifest, sim, pg_url, out) for _ in range(2)]
        for other in others:
            assert other.wait(180) == 0  # they take the frozen worker's jobs over once its leases expire
        ledger_before = len(sim.ledger.jobs)
        os.kill(sleeper.pid, signal.SIGCONT)
        sleeper.wait(60)
        tags = sim.ledger.tag_values()
        rows = store_rows(pg_url)
    duplicates = {tag: n for tag, n in tags.items() if n > 1}
    if lease_check == "off":  # the negative control: the check is what prevents this
        assert duplicates and set(duplicates) <= {f"mixed/{j}" for j in held}
        assert len(sim.ledger.jobs) > ledger_before
        return
    assert not duplicates and len(sim.ledger.jobs) == ledger_before == 8
    assert sleeper.returncode == 0
    assert {state for state, _ in rows.values()} == {"done"}
    assert {remote for _, remote in rows.values()} == {e.job_id for e in sim.ledger.jobs}
    assert_campaign_on_disk(sim, out, "mixed", job_ids(0, 0, 8))


def chaos(tmp_path: Path, pg_url: str, threaded_sim: Any, *, workers: int, kills: int, seed: int, **sizes: int) -> None:
    manifest = mixed_manifest(tmp_path, **sizes)
    ids = job_ids(sizes["trainings"], sizes["combined"], sizes["plain_images"])
    out = tmp_path / "out"
    rng = random.Random(seed)
    settings = fast_sim(seed=seed, time_scale=2000.0, faults=FaultPlan(rates=RATES, slow_s=1.0))
    with threaded_sim(settings) as sim:
        running = [worker(manifest, sim, pg_url, out) for _ in range(workers)]
        killed = 0
        while killed < kills:
            # Kill after a random amount of progress, counted in requests served (not time).
            target = sum(sim.ledger.requests.values()) + rng.randint(5, 30)
            wait_for(lambda target=target: sum(sim.ledger.requests.values()) >= target, 120, "progress")
            victim = rng.choice(running)
            victim.kill()
            victim.wait(30)
            killed += victim.returncode == -signal.SIGKILL
            running = [r for r in running if r is not victim] + [worker(manifest, sim, pg_url, out)]
        # One worker stands still past its lease while work is left, then goes on: its jobs
        # were taken over meanwhile, and all it still tries to write is refused.
        unfinished = sum(state not in ("done", "failed") for state, _ in store_rows(pg_url).values())
        still = rng.choice(running)
        os.kill(still.pid, signal.SIGSTOP)
        time.sleep(17)
        os.kill(still.pid, signal.SIGCONT)
        assert killed == kills and unfinished > 0, "every kill and the freeze must land mid-campaign"
        codes = [r.wait(300) for r in running]
        for _ in range(3):  # a worker may end early on a transient failure: one more, as cron would
            if all(state in ("done", "failed") for state, _ in store_rows(pg_url).values()):
                break
            codes.append(worker(manifest, sim, pg_url, out).wait(300))
        rows = store_rows(pg_url)
        tags = sim.ledger.tag_values()
        states = Counter(state for state, _ in rows.values())
        assert not {t: n for t, n in tags.items() if n > 1}, "a job was paid twice"
        assert states["submitting"] == 0 and set(states) <= {"done", "failed"}, (states, codes)
        by_tag = {next(t["value"] for t in e.tags if t["key"] == "dreamlook-batch"): e.job_id for e in sim.ledger.jobs}
        for job in ids:
            assert rows[job][1] == by_tag[f"mixed/{job}"], f"{job}: its remote id is not the one the service made"
        done = [j for j in ids if rows[j][0] == "done"]
        for job in done:
            expected = sim.expected_files(rows[job][1] or "")
            for line in (out / job / "SHA256SUMS").read_text().splitlines():
                digest, name = line.split("  ", 1)
                assert expected[name] == digest, f"{job}/{name}"
        assert not list(out.rglob("*.part"))


def test_chaos_workers_quick(tmp_path: Path, pg_url: str, threaded_sim: Any) -> None:
    chaos(tmp_path, pg_url, threaded_sim, workers=4, kills=5, seed=3, trainings=6, combined=3, plain_images=8)


@pytest.mark.slow
def test_chaos_workers_long(tmp_path: Path, pg_url: str, threaded_sim: Any) -> None:
    chaos(tmp_path, pg_url, threaded_sim, workers=6, kills=30, seed=11, trainings=40, combined=20, plain_images=60)
