"""Never pay twice when the service creates a job after we gave up on its answer
(the grace window), when the state is lost (adoption by tag), and never silently
when a second job with our tag turns up anyway (duplicates)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.cli import main
from orchestrator.config import Timeouts
from orchestrator.sim import FaultKind, FaultPlan, FaultRates, Route, ScriptedFault, Simulator
from orchestrator.store import SqliteDb
from orchestrator.store.schema import SCHEMA_V1, SCHEMA_VERSION

from .campaigns import assert_campaign_on_disk
from .conftest import cli_process, fast_run, fast_sim, write

IMAGE = "type: image_gen, base_model: stable-diffusion-v1-5"


def grace_yaml(folder: Path, count: int) -> Path:
    lines = ["campaign: grace", "jobs:"]
    lines += [f"- {{id: j{i}, {IMAGE}, prompt: p{i}}}" for i in range(count)]
    return write(folder / "grace.yaml", "\n".join(lines) + "\n")


def late_plan(count: int, late_s: float) -> FaultPlan:
    """The first `count` submissions are answered `late_s` late, and their jobs made only then."""
    return FaultPlan(
        script=(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.LATE_CREATE, count=count),), late_s=late_s
    )


def one_job_per_tag(sim: Simulator, campaign: str, ids: list[str]) -> None:
    assert sorted(sim.ledger.tag_values().items()) == [(f"{campaign}/{j}", 1) for j in ids]


def state_of(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return {r[0]: r[1] for r in conn.execute("SELECT id, state FROM jobs")}


# -- the grace window -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["script", "rate"])
async def test_a_job_created_late_inside_the_grace_window_is_found_not_paid_twice(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The client gives up after 1 s; the service makes each job at 1.5 s; the grace (one more
    # API timeout by default) looks at the list only at 2 s: every job is found there.
    plan = late_plan(4, 1.5) if how == "script" else FaultPlan(rates=FaultRates(late_create=0.5), late_s=1.5)
    manifest = load_manifest(grace_yaml(tmp_path, 4))
    settings = fast_run(settings={"timeouts": Timeouts(api_read_s=1.0)})
    async with Simulator(fast_sim(faults=plan, seed=3)) as sim:
        key = write(tmp_path / "key", sim.api_key)
        request = RunRequest(
            manifest=manifest, paths=paths_for(manifest), settings=settings, api_url=sim.url, api_key_file=key
        )
        with anyio.fail_after(60):
            result = await run_campaign(request)
        assert result.outcome.exit_code == 0, result.outcome.problems
        lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job.submit_unclear")]
        assert len(lost) == 4 if how == "script" else 1 <= len(lost) < 4, lost
        assert sim.ledger.requests["submit"] == 4  # nothing was sent a second time
        one_job_per_tag(sim, "grace", [f"j{i}" for i in range(4)])
        assert_campaign_on_disk(sim, result.paths.out, "grace", [f"j{i}" for i in range(4)])


@pytest.mark.broad  # left out of `make mutants` (time): see bench/MUTANTS.md
def test_a_job_created_beyond_the_grace_window_is_reported_as_a_duplicate(
    tmp_path: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The window (1 s timeout + 0.3 s grace) is shorter than the service's 3 s: the job is
    sent again and paid twice. That must never pass as a success."""
    manifest = grace_yaml(tmp_path, 2)
    # time scale 4: a job takes seconds, so the late copies exist before the run ends
    with threaded_sim(fast_sim(time_scale=4.0, faults=late_plan(2, 3.0))) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        args = ["--api-url", sim.url, "--time-scale", "4", "--api-timeout", "1", "--reconcile-grace", "0.3"]
        code = main(["run", str(manifest), *args])
        printed = capsys.readouterr()
        assert code == 1, printed.out + printed.err
        assert sorted(sim.ledger.tag_values().values()) == [2, 2]  # what the test set up: paid twice
        remote_of: dict[str, list[str]] = {}
        for entry in sim.ledger.jobs:
            tag = next(t["value"] for t in entry.tags if t["key"] == "dreamlook-batch")
            remote_of.setdefault(tag.split("/")[1], []).append(entry.job_id)
        for job_id, ids in remote_of.items():
            assert f"job.duplicate job_id={job_id} " in printed.err
            assert all(i in printed.err for i in ids)
        assert "DUPLICATE" in printed.out
        summary = json.loads((tmp_path / "outputs" / "grace" / "summary.json").read_text())
        assert summary["done"] is False
        jobs = {j["id"]: j for j in summary["jobs"]}
        for job_id, ids in remote_of.items():
            assert sorted([jobs[job_id]["remote_id"], *jobs[job_id]["duplicate_remote_ids"]]) == sorted(ids)
            assert summary["duplicates"][job_id] == jobs[job_id]["duplicate_remote_ids"]
        # Both results stay reachable: one downloaded, the other listed by status.
        for job_id in remote_of:
            assert (tmp_path / "outputs" / "grace" / job_id / "SHA256SUMS").read_text()
        assert main(["status", str(manifest), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert {j["id"]: j["duplicate_remote_ids"] for j in status["jobs"]} == summary["duplicates"]
        assert main(["status", str(manifest)]) == 0
        assert "DUPLICATE" in capsys.readouterr().out
        # --once too: the duplicate stays on record and keeps the exit code at 1.
        assert main(["run", str(manifest), "--once", *args]) == 1


def test_kill_9_while_the_service_creates_late_then_restart_at_once(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = grace_yaml(tmp_path, 3)
    # The window: 3 s + 3 s grace from each attempt; the service makes the jobs at 4 s, after
    # the restart has begun (a new process takes about a second to start).
    quick = ("--api-timeout", "3")
    late_s = 4.0
    with threaded_sim(fast_sim(faults=late_plan(3, late_s))) as sim:
        first = cli_process(manifest, sim, *quick)
        deadline = time.monotonic() + 30
        while sim.ledger.requests["submit"] < 3:
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the submissions never arrived"
            time.sleep(0.01)
        posted = time.monotonic()
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
        assert set(state_of(tmp_path / ".dreamlook-batch" / "grace.db").values()) == {"submitting"}
        second = cli_process(manifest, sim, *quick)
        out = second.communicate(timeout=60)[0]
        assert second.returncode == 0, out
        time.sleep(max(0.0, posted + late_s + 0.5 - time.monotonic()))  # every late creation has happened
        one_job_per_tag(sim, "grace", ["j0", "j1", "j2"])
        assert sim.ledger.requests["submit"] == 3
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "grace", "grace", ["j0", "j1", "j2"])


@pytest.mark.broad  # left out of `make mutants` (time): see bench/MUTANTS.md
def test_once_leaves_a_job_in_its_window_submitting_and_says_so(
    tmp_path: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = grace_yaml(tmp_path, 2)
    with threaded_sim(fast_sim(faults=late_plan(1, 0.5))) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        # A long grace: the window surely outlasts this pass and the status/plan below.
        args = ["--api-url", sim.url, "--time-scale", "20000", "--api-timeout", "0.3", "--reconcile-grace", "3"]
        assert main(["run", str(manifest), "--once", *args]) == 0
        out = capsys.readouterr().out
        assert "j0: its answer was lost; it stays submitting until" in out
        assert state_of(tmp_path / ".dreamlook-batch" / "grace.db")["j0"] == "submitting"
        assert main(["status", str(manifest)]) == 0
        assert "waiting until" in capsys.readouterr().out
        assert main(["plan", str(manifest)]) == 0
        assert "j0: waiting until" in capsys.readouterr().out
        assert main(["run", str(manifest), "--once", *args]) == 0  # still inside: left alone
        assert state_of(tmp_path / ".dreamlook-batch" / "grace.db")["j0"] == "submitting"
        assert sim.ledger.requests["submit"] == 2
        deadline = time.monotonic() + 60
        while set(state_of(tmp_path / ".dreamlook-batch" / "grace.db").values()) != {"done"}:
            assert time.monotonic() < deadline, state_of(tmp_path / ".dreamlook-batch" / "grace.db")
            time.sleep(0.5)
            assert main(["run", str(manifest), "--once", *args]) == 0
        capsys.readouterr()
        one_job_per_tag(sim, "grace", ["j0", "j1"])
        assert sim.ledger.requests["submit"] == 2
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "grace", "grace", ["j0", "j1"])


# -- a lost state: adoption by tag ----------------------------------------------------


def _files(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("summary.json", "job.json")
    }


@pytest.mark.parametrize("loss", ["deleted-folder", "empty-file", "mistyped-state"])
def test_a_lost_state_adopts_the_jobs_the_service_holds(tmp_path: Path, threaded_sim: Any, loss: str) -> None:
    manifest = write(
        tmp_path / "lost.yaml",
        "campaign: lost\njobs:\n"
        "- {id: t, type: dreambooth, instance_prompt: p, image_urls: [u], base_model: stable-diffusion-v1-5}\n"
        "- {id: t-img, type: image_gen, checkpoint_from: t, prompt: q}\n"
        + "".join(f"- {{id: g{i}, {IMAGE}, prompt: g{i}}}\n" for i in range(3)),
    )
    ids = ["t", "t-img", "g0", "g1", "g2"]
    out = tmp_path / "outputs" / "lost"
    with threaded_sim(fast_sim()) as sim:
        first = cli_process(manifest, sim)
        assert first.wait(60) == 0
        before = _files(out)
        made = len(sim.ledger.jobs)
        state = tmp_path / ".dreamlook-batch" / "lost.db"
        extra: tuple[str, ...] = ()
        if loss == "deleted-folder":
            shutil.rmtree(state.parent)
        elif loss == "empty-file":  # refused, untouched, until a person removes it (it may stand for paid jobs)
            state.write_bytes(b"")
            refused = cli_process(manifest, sim)
            printed = refused.communicate(timeout=60)[0]
            assert refused.returncode == 2 and "is empty (0 bytes): not a state file" in printed, printed
            assert sim.ledger.requests["submit"] == made and state.stat().st_size == 0
            state.unlink()
        else:
            extra = ("--state", str(tmp_path / "typo" / "lots.db"))
        again = cli_process(manifest, sim, "-v", *extra)
        printed = again.communicate(timeout=60)[0]
        assert again.returncode == 0, printed
        assert "campaign.adopted count=5" in printed
        assert len(sim.ledger.jobs) == made  # nothing paid again
        assert sim.ledger.requests["submit"] == made
        assert _files(out) == before  # the same files, byte for byte; no second set
        assert_campaign_on_disk(sim, out, "lost", ids)
        # Adoption is looked for once per job: the next run reads no job list for it.
        lists = sim.ledger.requests["list"]
        assert cli_process(manifest, sim, *extra).wait(60) == 0
        assert sim.ledger.requests["list"] == lists


def test_a_list_without_tags_cannot_adopt_and_says_so(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = grace_yaml(tmp_path, 1)
    with threaded_sim(fast_sim(list_echoes_tags=False)) as sim:
        assert cli_process(manifest, sim).wait(60) == 0
        shutil.rmtree(tmp_path / ".dreamlook-batch")
        again = cli_process(manifest, sim)
        printed = again.communicate(timeout=60)[0]
        assert again.returncode == 0, printed
        assert "shows no tags" in printed and "keep the state file safe" in printed
        assert len(sim.ledger.jobs) == 2  # as warned: without tags it cannot tell


# -- the store ------------------------------------------------------------------------


def test_a_version_1_state_file_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        for statement in filter(str.strip, SCHEMA_V1.split(";")):
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute(
            "INSERT INTO jobs (id, type, state, fingerprint, intent_at, updated_at, position)"
            " VALUES ('a', 'image_gen', 'submitting', 'f', 100.0, 100.0, 0),"
            " ('b', 'image_gen', 'pending', 'f', NULL, 100.0, 1)"
        )
    store = SqliteDb(path)
    try:
        a, b = store.job("a"), store.job("b")
        assert (a.attempt_at, a.adoption_checked, a.duplicate_ids) == (100.0, True, ())
        assert (b.attempt_at, b.adoption_checked) == (None, False)
        assert store.record_duplicates("a", ["x", "y"]) and not store.record_duplicates("a", ["y"])
        assert store.duplicates() == {"a": ("x", "y")}
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_no_job_is_sent_while_its_tag_cannot_be_looked_for(tmp_path: Path, threaded_sim: Any) -> None:
    """A fresh state and a job list that keeps failing: nothing is sent, and the run says why."""
    manifest = grace_yaml(tmp_path, 2)
    # The check before the first POST lists one job (request 1); adoption's reads all fail.
    failing = FaultPlan(script=(ScriptedFault(route=Route.LIST, kind=FaultKind.SERVER_ERROR, nth=2, count=10_000),))
    with threaded_sim(fast_sim(faults=failing)) as sim:
        run = cli_process(manifest, sim)
        printed = run.communicate(timeout=60)[0]
        assert run.returncode == 1, printed
        assert "could not read the job list to look for jobs of this campaign" in printed
        assert sim.ledger.requests["submit"] == 0 and not sim.ledger.jobs
        sim.set_faults(FaultPlan())
        again = cli_process(manifest, sim)
        assert again.wait(60) == 0
        one_job_per_tag(sim, "grace", ["j0", "j1"])


@pytest.mark.anyio
async def test_a_job_list_that_cannot_be_read_leaves_a_lost_answer_submitting_not_unknown(tmp_path: Path) -> None:
    """Failing to read the list proves nothing: the job is neither resent nor `unknown`; a later run finds it."""
    manifest = load_manifest(grace_yaml(tmp_path, 1))
    settings = fast_run(settings={"timeouts": Timeouts(api_read_s=1.0)})
    # The check before the first POST and adoption read the list (requests 1 and 2); every later read fails.
    broken_list = ScriptedFault(route=Route.LIST, kind=FaultKind.SERVER_ERROR, nth=3, count=10_000)
    lost_answer = ScriptedFault(route=Route.SUBMIT, kind=FaultKind.LATE_CREATE)
    async with Simulator(fast_sim(faults=FaultPlan(script=(lost_answer, broken_list), late_s=1.5))) as sim:
        key = write(tmp_path / "key", sim.api_key)
        request = RunRequest(
            manifest=manifest, paths=paths_for(manifest), settings=settings, api_url=sim.url, api_key_file=key
        )
        with anyio.fail_after(60):
            first = await run_campaign(request)
        assert first.outcome.exit_code == 1
        assert state_of(first.paths.state) == {"j0": "submitting"}
        assert any("the next run looks again" in p for p in first.outcome.problems), first.outcome.problems
        sim.set_faults(FaultPlan())
        with anyio.fail_after(60):
            second = await run_campaign(request)
        assert second.outcome.exit_code == 0, second.outcome.problems
        assert sim.ledger.requests["submit"] == 1
        one_job_per_tag(sim, "grace", ["j0"])
        assert_campaign_on_disk(sim, second.paths.out, "grace", ["j0"])
