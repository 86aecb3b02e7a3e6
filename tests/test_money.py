"""Never pay twice, never lose a job: crashes at the worst moments, lost answers,
ambiguous listings, spending caps, manifest edits, clean shutdown."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.cli import main
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator

from .campaigns import assert_campaign_on_disk
from .conftest import cli_process, fast_run, fast_sim, write

ROOT = Path(__file__).resolve().parent.parent


def jobs_yaml(folder: Path, count: int, *, same_config: bool = False) -> Path:
    lines = ["campaign: money", "jobs:"]
    for i in range(count):
        prompt = "p" if same_config else f"p{i}"
        lines.append(f"- {{id: j{i}, type: image_gen, prompt: {prompt}, base_model: stable-diffusion-v1-5}}")
    return write(folder / "money.yaml", "\n".join(lines) + "\n")


def cli(manifest: Path, sim: Any, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # A short API timeout: a lost answer is looked for after timeout + grace (4 s), also after a kill.
    return cli_process(manifest, sim, "--api-timeout", "2", *extra, env=env)


def states(manifest: Path) -> dict[str, tuple[str, str | None]]:
    db = manifest.parent / ".dreamlook-batch" / "money.db"
    with sqlite3.connect(db) as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, state, remote_id FROM jobs")}


@pytest.mark.parametrize("tags_listed", [True, False], ids=["list-has-tags", "list-without-tags"])
@pytest.mark.parametrize("moment", ["after-intent", "after-post"])
def test_a_kill_between_intent_post_and_id_commit_never_makes_a_second_job(
    tmp_path: Path, threaded_sim: Any, moment: str, tags_listed: bool
) -> None:
    manifest = jobs_yaml(tmp_path, 3)
    with threaded_sim(fast_sim(list_echoes_tags=tags_listed)) as sim:
        crashed = cli(manifest, sim, env={"DREAMLOOK_BATCH_CRASH_AT": moment})
        crashed.communicate(timeout=60)
        assert crashed.returncode == -signal.SIGKILL
        left = states(manifest)
        assert {s for s, _ in left.values()} <= {"submitting", "pending"} and "submitting" in {
            s for s, _ in left.values()
        }
        assert all(remote is None for _, remote in left.values())  # no id was committed
        created_by_crash = len(sim.ledger.jobs)
        assert (created_by_crash == 0) if moment == "after-intent" else (created_by_crash >= 1)
        rerun = cli(manifest, sim)
        out = rerun.communicate(timeout=60)[0]
        assert rerun.returncode == 0, out
        assert sorted(sim.ledger.tag_values().items()) == [(f"money/j{i}", 1) for i in range(3)]
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "money", "money", ["j0", "j1", "j2"])


@pytest.mark.anyio
@pytest.mark.parametrize("tags_listed", [True, False], ids=["list-has-tags", "list-without-tags"])
async def test_lost_answers_during_a_run_are_reconciled_not_resent(tmp_path: Path, tags_listed: bool) -> None:
    script = (
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST, nth=1),
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST_5XX, nth=2),
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.SLOW, nth=3),
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.SERVER_ERROR, nth=4),  # refused before creating
    )
    plan = FaultPlan(script=script, slow_s=1.0)
    manifest = load_manifest(jobs_yaml(tmp_path, 8))
    settings = fast_run(settings={"timeouts": fast_run().timeouts.__class__(api_read_s=0.3)})
    async with Simulator(fast_sim(list_echoes_tags=tags_listed, faults=plan)) as sim:
        key = write(tmp_path / "key", sim.api_key)
        request = RunRequest(
            manifest=manifest, paths=paths_for(manifest), settings=settings, api_url=sim.url, api_key_file=key
        )
        with anyio.fail_after(60):
            result = await run_campaign(request)
        assert result.outcome.exit_code == 0, result.outcome.problems
        assert sorted(sim.ledger.tag_values().values()) == [1] * 8
        assert sim.ledger.requests["submit"] == 9  # 8, and the one refused with a 5xx sent again
        assert_campaign_on_disk(sim, result.paths.out, "money", [f"j{i}" for i in range(8)])


# A ghost's job exists before its connection drops: nothing to wait for before reading the list.
QUICK_LOOK = ("--reconcile-grace", "0.2")


@pytest.mark.broad  # left out of `make mutants` (time): see bench/MUTANTS.md
def test_an_ambiguous_listing_makes_unknown_and_a_person_settles_it(
    tmp_path: Path, threaded_sim: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = jobs_yaml(tmp_path, 2, same_config=True)
    script = (
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST, nth=1),
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST, nth=2),
    )
    with threaded_sim(fast_sim(list_echoes_tags=False, faults=FaultPlan(script=script))) as sim:
        first = cli(manifest, sim, "--max-active", "1", *QUICK_LOOK)
        out = first.communicate(timeout=60)[0]
        # j0 is found by config (one match). j1's config matches j1's ghost only, since j0's is claimed.
        assert first.returncode == 0, out
        assert len(sim.ledger.jobs) == 2
    with threaded_sim(fast_sim(list_echoes_tags=False, faults=FaultPlan(script=script))) as sim:
        first = cli(
            manifest,
            sim,
            "--max-active",
            "2",
            "--state",
            str(tmp_path / "other.db"),
            "--out",
            str(tmp_path / "other"),
            *QUICK_LOOK,
        )
        out = first.communicate(timeout=60)[0]
        assert first.returncode == 1, out  # both ghosts at once: two identical listed jobs, two claimants
        assert "unknown whether it was created" in out and "settle" in out
        assert len(sim.ledger.jobs) == 2  # nothing was sent a second time
        base = ["--state", str(tmp_path / "other.db"), "--out", str(tmp_path / "other")]
        capsys.readouterr()
        assert main(["status", str(manifest), "--json", *base]) == 0
        assert {j["state"] for j in json.loads(capsys.readouterr().out)["jobs"]} == {"unknown"}
        ids = [e.job_id for e in sim.ledger.jobs]
        assert main(["settle", str(manifest), "j0", "--remote-id", ids[0], *base]) == 0
        assert main(["settle", str(manifest), "j1", "--remote-id", ids[1], *base]) == 0
        assert main(["settle", str(manifest), "j1", "--give-up", *base]) == 1  # no longer unknown
        again = cli(manifest, sim, *base)
        out = again.communicate(timeout=60)[0]
        assert again.returncode == 0, out
        assert len(sim.ledger.jobs) == 2
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["j0", "j1", "summary.json"]


def test_max_new_jobs_caps_what_one_run_may_submit(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = jobs_yaml(tmp_path, 5)
    with threaded_sim(fast_sim()) as sim:
        for expected in (2, 4, 5):
            run = cli(manifest, sim, "--max-new-jobs", "2")
            out = run.communicate(timeout=60)[0]
            assert len(sim.ledger.jobs) == expected, out
        assert run.returncode == 0


def test_manifest_edits_between_runs(tmp_path: Path, threaded_sim: Any, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = jobs_yaml(tmp_path, 2)
    with threaded_sim(fast_sim()) as sim:
        assert cli(manifest, sim).wait(60) == 0
        manifest.write_text(
            manifest.read_text().replace("prompt: p0", "prompt: p0 fixed")
            + "- {id: j2, type: image_gen, prompt: q, base_model: stable-diffusion-v1-5}\n"
        )
        capsys.readouterr()
        assert main(["plan", str(manifest)]) == 0
        assert "changed after submission (will not be resubmitted): j0" in capsys.readouterr().out
        run = cli(manifest, sim)
        out = run.communicate(timeout=60)[0]
        assert run.returncode == 0, out
        assert "j0: its configuration changed after it was submitted" in out
        assert sorted(sim.ledger.tag_values()) == ["money/j0", "money/j1", "money/j2"]
        assert len(sim.ledger.jobs) == 3


def test_sigterm_stops_submitting_saves_and_exits_130(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = jobs_yaml(tmp_path, 30)
    # Slow storage: downloads are still going when the signal comes.
    with threaded_sim(fast_sim(download_bytes_per_s=2_000.0)) as sim:
        run = cli(manifest, sim, "--max-active", "10", "--submit-rate", "20")
        deadline = time.monotonic() + 30
        while len(sim.ledger.jobs) < 5:
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.01)
        run.send_signal(signal.SIGTERM)
        out = run.communicate(timeout=30)[0]
        assert run.returncode == 130, out
        assert "interrupted: state saved" in out
        submitted = len(sim.ledger.jobs)
        assert submitted < 30
        left = states(manifest)
        assert "submitting" not in {s for s, _ in left.values()}
        rerun = cli(manifest, sim, "--max-active", "30")
        out = rerun.communicate(timeout=60)[0]
        assert rerun.returncode == 0, out
        assert sorted(sim.ledger.tag_values().values()) == [1] * 30
