"""Paid for, then stopped by something that could have been checked first: every check
before the first paid POST, through the real CLI (or engine) against the simulator.

A failed check exits 2 (a refused key: 3) and the simulator's ledger shows nothing sent;
a request that provably never left puts its job back to pending, never `unknown`; a
dependent is never stranded; no `Retry-After` takes a run down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.api.budget import RequestBudget
from orchestrator.api.client import ApiClient
from orchestrator.cli import main
from orchestrator.config import Timeouts
from orchestrator.errors import NotSent, PreflightFailed, Throttled
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import JobState, JobType
from orchestrator.run.engine import Engine
from orchestrator.run.outcome import StopReason
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator
from orchestrator.store import SqliteDb, SqliteStore
from orchestrator.transfer.file import Downloader

from .campaigns import assert_campaign_on_disk
from .conftest import fast_run, fast_sim, write

JOBS = Path(__file__).resolve().parent.parent / "jobs"
FAST = ["--max-active", "50", "--submit-rate", "500", "--requests-per-s", "2000", "--time-scale", "20000"]
EXAMPLE_IDS = ["alice", "alice-portraits", "bob-all-in-one"]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    shutil.copy(JOBS / "example.yaml", tmp_path / "example.yaml")
    return tmp_path / "example.yaml"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`main(args)`: its exit code and everything it printed."""
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def closed_port_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def state_of(db: Path) -> dict[str, str]:
    if not db.exists():
        return {}
    with sqlite3.connect(db) as conn:
        return {r[0]: r[1] for r in conn.execute("SELECT id, state FROM jobs")}


def nothing_sent(sim: Simulator) -> bool:
    return sim.ledger.jobs == [] and sim.ledger.requests["submit"] == 0


# -- the output folder and the state store --------------------------------------------


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "read-only-folder"])
def test_an_out_that_cannot_be_written_exits_2_and_sends_nothing(
    example: Path, tmp_path: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any, where: str
) -> None:
    blocker = write(tmp_path / "taken", "a file, not a folder\n")
    out = {"a-file": blocker, "under-a-file": blocker / "outputs", "read-only-folder": tmp_path / "ro" / "out"}[where]
    if where == "read-only-folder":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable (a-file and under-a-file cover it)")
    with threaded_sim(fast_sim()) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        for command in (["run", *FAST], ["run", "--dry-run", *FAST], ["plan"]):
            code, printed = run([*command, str(example), "--api-url", sim.url, "--out", str(out)], capsys)
            assert code == 2, printed
            assert f"--out {out}" in printed and "Nothing was sent" in printed
        assert nothing_sent(sim) and sum(sim.ledger.requests.values()) == 0
    (tmp_path / "ro").chmod(0o700) if where == "read-only-folder" else None
    assert blocker.read_text() == "a file, not a folder\n"
    assert state_of(example.parent / ".dreamlook-batch" / "example.db") == {}


@pytest.mark.parametrize("where", ["a-folder", "under-a-file"])
def test_a_state_that_cannot_be_written_exits_2_and_sends_nothing(
    example: Path, tmp_path: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any, where: str
) -> None:
    blocker = write(tmp_path / "taken", "x\n")
    state = {"a-folder": tmp_path, "under-a-file": blocker / "s.db"}[where]
    with threaded_sim(fast_sim()) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        for command in ("run", "plan"):
            code, printed = run([command, str(example), "--api-url", sim.url, "--state", str(state)], capsys)
            assert code == 2, printed
            assert f"--state {state}" in printed and "Nothing was sent" in printed
        assert sum(sim.ledger.requests.values()) == 0


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` made unwritable, even for root (chattr +i) where chmod alone would not do."""
    path.chmod(0o400)
    immutable = False
    if os.access(path, os.W_OK):  # root
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], check=False).returncode:
            path.chmod(0o600)
            pytest.skip("running as root without a working chattr: cannot make a file read-only")
        immutable = True
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o600)


def test_a_state_store_that_takes_no_write_exits_2_and_sends_nothing(
    example: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    db = example.parent / ".dreamlook-batch" / "example.db"
    SqliteDb(db).close()
    with threaded_sim(fast_sim()) as sim, read_only(db):
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        code, printed = run(["run", str(example), "--api-url", sim.url, *FAST], capsys)
        assert code == 2, printed
        assert f"--state {db}: cannot be written" in printed and "Nothing was sent" in printed
        assert sum(sim.ledger.requests.values()) == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--out", "gs://bucket/x"),  # s3:// is handled: tests/test_bucket.py
        ("--out", "http://example.com/x"),
        ("--state", "mysql://me:hunter2@db.example.com/campaigns"),
        ("--state", "s3://bucket/state.db"),
    ],
)
def test_a_location_with_a_scheme_the_tool_does_not_handle_is_refused(
    example: Path,
    tmp_path: Path,
    threaded_sim: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    option: str,
    value: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # where a local folder `s3:` used to appear
    with threaded_sim(fast_sim()) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        for command in (["run", *FAST], ["plan"], ["status"]):
            code, printed = run([*command, str(example), "--api-url", sim.url, option, value], capsys)
            scheme = value.split("://")[0]
            assert code == 2 and f"{scheme}:// locations are not supported" in printed, printed
            assert "hunter2" not in printed
        assert sum(sim.ledger.requests.values()) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.yaml"]


# -- the API: reachable, the right URL, the key ------------------------------------------


def test_a_closed_port_then_the_right_url_finishes_without_settle(
    example: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    closed = closed_port_url()
    with threaded_sim(fast_sim()) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        code, printed = run(["run", str(example), "--api-url", closed, *FAST], capsys)
        assert code == 2, printed
        assert f"the API at {closed} cannot be used" in printed and "Connect call failed" in printed
        assert "Nothing was sent" in printed and sim.api_key not in printed
        assert set(state_of(example.parent / ".dreamlook-batch" / "example.db").values()) <= {"pending"}
        code, printed = run(["run", str(example), "--api-url", sim.url, *FAST], capsys)
        assert code == 0, printed
        assert sorted(sim.ledger.tag_values().items()) == [(f"example/{j}", 1) for j in EXAMPLE_IDS]
        assert_campaign_on_disk(sim, example.parent / "outputs" / "example", "example", EXAMPLE_IDS)


@pytest.mark.parametrize("url", ["notaurl", "ftp://x", "http://", "https:///path-only"])
def test_a_mistyped_api_url_exits_2_before_anything(
    example: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, url: str
) -> None:
    monkeypatch.setenv("DREAMLOOK_API_KEY", "dl-" + "12" * 16)
    for args in (["run", str(example)], ["jobs", "list", "dreambooth"]):
        code, printed = run([*args, "--api-url", url], capsys)
        assert code == 2 and "is not an http(s) URL with a host" in printed, printed
    assert state_of(example.parent / ".dreamlook-batch" / "example.db") == {}


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["closed-port", "notaurl", "ftp://x"])
async def test_a_submission_that_never_left_goes_back_to_pending_never_unknown(
    example: Path, tmp_path: Path, url: str
) -> None:
    """Past the checks (the API went away after them): the engine itself, on its own."""
    base = closed_port_url() if url == "closed-port" else url
    manifest = load_manifest(example)
    settings = fast_run()
    earlier = SqliteDb(tmp_path / "state.db")
    # An earlier run looked for these jobs' tags (adoption) before the API went away.
    earlier.sync_manifest(manifest.campaign, manifest.jobs, [spec_fingerprint(s) for s in manifest.jobs], 0.0)
    earlier.adopt([], EXAMPLE_IDS, 0.0)
    earlier.close()
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        async with (
            ApiClient(base, "dl-" + "12" * 16, budget=RequestBudget(1000.0)) as api,
            Downloader(timeouts=Timeouts()) as downloader,
        ):
            engine = Engine(manifest, store, api, downloader, settings, tmp_path / "out")
            with anyio.fail_after(60):
                outcome = await engine.run()
        states = {row.id: row.state for row in await store.jobs()}
    finally:
        await store.close()
    assert states == dict.fromkeys(EXAMPLE_IDS, JobState.PENDING)  # the dependent is not skipped either
    assert outcome.stopped_by == StopReason.UNREACHABLE and outcome.exit_code == 1
    assert any("nothing was created" in p for p in outcome.problems), outcome.problems


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["closed-port", "notaurl", "ftp://x"])
async def test_the_client_calls_a_request_that_cannot_have_left_not_sent(url: str) -> None:
    base = closed_port_url() if url == "closed-port" else url
    async with ApiClient(base, "dl-" + "12" * 16) as api:
        with pytest.raises(NotSent) as caught:
            await api.submit(JobType.IMAGE_GEN, {"prompt": "x"})
    assert base.split("://")[-1] in str(caught.value)


@pytest.mark.anyio
async def test_an_api_that_does_not_answer_is_reported_within_the_deadline(example: Path) -> None:
    plan = FaultPlan(script=(ScriptedFault(route=Route.LIST, kind=FaultKind.SLOW, count=100),), slow_s=5.0)
    manifest = load_manifest(example)
    settings = replace(fast_run(), preflight_deadline_s=0.5)
    async with Simulator(fast_sim(faults=plan)) as sim:
        key = write(example.parent / "key", sim.api_key)
        request = RunRequest(
            manifest=manifest, paths=paths_for(manifest), settings=settings, api_url=sim.url, api_key_file=key
        )
        with anyio.fail_after(20), pytest.raises(PreflightFailed, match=r"did not answer within 0\.5 s"):
            await run_campaign(request)
        assert nothing_sent(sim)


# -- a dependent is never stranded ----------------------------------------------------


@pytest.mark.broad  # left out of `make mutants` (time): see bench/MUTANTS.md
def test_a_parent_settled_after_being_unknown_brings_its_dependents_back(
    tmp_path: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # Two identical trainings sent at once, both answers lost, and a job list without tags:
    # two listed jobs match both configs, so both are unknown and j0's dependent is skipped.
    training = (
        "type: dreambooth, base_model: stable-diffusion-v1-5, instance_prompt: ukj, image_urls: [https://x/a.jpg]"
    )
    manifest = write(
        tmp_path / "twins.yaml",
        "campaign: twins\njobs:\n"
        f"- {{id: j0, {training}}}\n- {{id: j1, {training}}}\n"
        "- {id: j0-portraits, type: image_gen, checkpoint_from: j0, prompt: portrait of ukj}\n",
    )
    ghosts = FaultPlan(
        script=(
            ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST, nth=1),
            ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST, nth=2),
        )
    )
    db = tmp_path / ".dreamlook-batch" / "twins.db"
    with threaded_sim(fast_sim(list_echoes_tags=False, faults=ghosts)) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        args = [str(manifest), "--api-url", sim.url, *FAST, "--max-active", "2", "--api-timeout", "2"]
        code, printed = run(["run", *args], capsys)
        assert code == 1, printed
        assert state_of(db) == {"j0": "unknown", "j1": "unknown", "j0-portraits": "skipped"}
        first, second = (e.job_id for e in sim.ledger.jobs)
        code, printed = run(["settle", str(manifest), "j0", "--remote-id", first], capsys)
        assert code == 0 and "pending again: j0-portraits" in printed, printed
        assert state_of(db)["j0-portraits"] == "pending"
        assert run(["settle", str(manifest), "j1", "--remote-id", second], capsys)[0] == 0
        code, printed = run(["run", *args], capsys)
        assert code == 0, printed
        assert sorted(sim.ledger.tag_values().items()) == [(f"twins/{j}", 1) for j in ("j0", "j0-portraits", "j1")]
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "twins", "twins", ["j0", "j0-portraits", "j1"])


# -- Retry-After beyond the request budget's own deadline ---------------------------------


@pytest.mark.broad  # left out of `make mutants` (time): see bench/MUTANTS.md
@pytest.mark.anyio
@pytest.mark.parametrize("route", [Route.SUBMIT, Route.GET, Route.LIST])
async def test_a_retry_after_of_an_hour_is_capped_and_the_run_finishes(
    example: Path, caplog: pytest.LogCaptureFixture, route: Route
) -> None:
    # LIST: the 2nd listing on (the 1st is the check before any POST): adoption's, then the
    # one that looks for alice's lost answer; SUBMIT and GET: the first ones.
    first = 2 if route is Route.LIST else 1
    script = [ScriptedFault(route=route, kind=FaultKind.RATE_LIMITED, nth=first, count=3, arg=3600)]
    if route is Route.LIST:
        script.append(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST, nth=1))
    manifest = load_manifest(example)
    base = fast_run(settings={"timeouts": Timeouts(api_read_s=1.0)})  # a short grace window for the lost answer
    settings = replace(base, retry=replace(base.retry, retry_after_cap_s=0.2))
    async with Simulator(fast_sim(faults=FaultPlan(script=tuple(script)))) as sim:
        key = write(example.parent / "key", sim.api_key)
        request = RunRequest(
            manifest=manifest, paths=paths_for(manifest), settings=settings, api_url=sim.url, api_key_file=key
        )
        with caplog.at_level(logging.WARNING), anyio.fail_after(60):
            result = await run_campaign(request)
        assert result.outcome.exit_code == 0, result.outcome.problems
        assert sorted(sim.ledger.tag_values().items()) == [(f"example/{j}", 1) for j in EXAMPLE_IDS]
        assert_campaign_on_disk(sim, result.paths.out, "example", EXAMPLE_IDS)
    assert "api.retry_after_capped asked_s=3600 used_s=0.2" in caplog.text


@pytest.mark.anyio
async def test_a_budget_wait_past_its_deadline_is_not_sent_not_a_timeout() -> None:
    budget = RequestBudget(1.0, max_wait_s=0.3)
    await budget.acquire()  # the one token there is
    with pytest.raises(Throttled):  # a NotSent: every caller puts its job back, none crashes
        await budget.acquire()
    assert budget.pause(3600) == pytest.approx(0.15)  # never more than half the deadline


@pytest.mark.anyio
async def test_a_submission_whose_budget_wait_runs_out_goes_back_to_pending_and_goes_later(
    example: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One submission a second, and a budget deadline far shorter: the waiting ones are
    put back (never sent, never unknown, the run does not crash) and go in later passes."""
    manifest = load_manifest(example)
    settings = replace(fast_run(submit_rate_per_s=1.0), budget_wait_s=0.2)
    async with Simulator(fast_sim()) as sim:
        key = write(example.parent / "key", sim.api_key)
        request = RunRequest(
            manifest=manifest, paths=paths_for(manifest), settings=settings, api_url=sim.url, api_key_file=key
        )
        with caplog.at_level(logging.INFO), anyio.fail_after(60):
            result = await run_campaign(request)
        assert result.outcome.exit_code == 0, result.outcome.problems
        assert sorted(sim.ledger.tag_values().items()) == [(f"example/{j}", 1) for j in EXAMPLE_IDS]
        assert_campaign_on_disk(sim, result.paths.out, "example", EXAMPLE_IDS)
    assert (
        'job.not_sent job_id=bob-all-in-one state=pending reason="the request budget did not let the request go'
        in caplog.text
    )
