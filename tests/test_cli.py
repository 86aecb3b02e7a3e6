"""The command line as a user runs it: exit codes, messages, and nothing sent on bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.sim import FaultPlan, FaultRates, SimSettings
from orchestrator.store import CampaignLock

from .conftest import fast_sim, write

JOBS = Path(__file__).resolve().parent.parent / "jobs"
FAST = ["--max-active", "50", "--submit-rate", "500", "--requests-per-s", "2000", "--time-scale", "20000"]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    shutil.copy(JOBS / "example.yaml", tmp_path / "example.yaml")
    return tmp_path / "example.yaml"


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> Any:
    def use(sim: Any) -> None:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        monkeypatch.setenv("DREAMLOOK_API_URL", sim.url)

    return use


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_example_exits_0_and_says_where_the_files_are(
    example: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        code, out, _ = run(["run", str(example), *FAST], capsys)
        assert code == 0, out
        assert "3 done" in out and str(example.parent / "outputs" / "example") in out
        assert len(sim.ledger.jobs) == 3
        # cron again: nothing to do, still 0, nothing sent
        before = dict(sim.ledger.requests)
        code, out, _ = run(["run", str(example), "--once"], capsys)
        assert code == 0 and dict(sim.ledger.requests) == before
    assert sorted(p.name for p in (example.parent / "outputs" / "example").iterdir()) == [
        "alice",
        "alice-portraits",
        "bob-all-in-one",
        "summary.json",
    ]


def test_broken_manifest_exits_2_names_the_place_and_sends_nothing(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(tmp_path / "bad.yaml", "jobs:\n  - id: a\n    type: dreambooth\n    steps: 12\n")
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        for command in ("validate", "plan", "run"):
            code, _, err = run([command, str(bad)], capsys)
            assert code == 2
            assert f"{bad}:2: job 'a': missing required field image_urls" in err
            assert "nothing was sent" in err
        assert sum(sim.ledger.requests.values()) == 0
    assert not (tmp_path / ".dreamlook-batch").exists()


def test_no_key_is_a_usage_error(
    example: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DREAMLOOK_API_KEY", raising=False)
    code, _, err = run(["run", str(example)], capsys)
    assert code == 2 and "DREAMLOOK_API_KEY" in err


def test_a_negative_limit_is_a_usage_error(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for option, said in [
        ("--max-new-jobs", "argument --max-new-jobs: '-1': give a whole number of at least 0"),
        ("--max-active", "argument --max-active: '-1': give a whole number of at least 1"),
    ]:
        with pytest.raises(SystemExit) as exited:  # argparse's usage error
            main(["run", str(example), option, "-1"])
        assert exited.value.code == 2 and said in capsys.readouterr().err


def test_a_bad_key_stops_with_3_and_never_prints_the_key(
    example: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "dl-" + "ab" * 16
    with threaded_sim(fast_sim()) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", wrong)
        code, out, err = run(["run", str(example), "--api-url", sim.url, "-v"], capsys)
        assert sim.ledger.jobs == [] and sim.ledger.requests["submit"] == 0  # checked before the first POST
    assert code == 3 and "401" in err and "DREAMLOOK_API_KEY" in err and "Nothing was sent" in err
    assert wrong not in out + err and "abab" not in out + err


def test_out_of_tokens_stops_submitting_with_3_but_finishes_what_is_paid(
    example: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim(tokens=12)) as sim:  # alice (12 tokens) only
        keyed(sim)
        code, out, _ = run(["run", str(example), *FAST], capsys)
        assert code == 3 and "403" in out and "out of tokens" in out
        assert [e.job_type for e in sim.ledger.jobs] == ["dreambooth"]
    assert (example.parent / "outputs" / "example" / "alice" / "SHA256SUMS").read_text().count("\n") == 2


def test_second_process_exits_4_and_names_the_holder(
    example: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        state = example.parent / ".dreamlook-batch" / "example.db"
        with CampaignLock(state):
            code, _, err = run(["run", str(example)], capsys)
        assert code == 4 and f"pid {os.getpid()}" in err and "example.db.lock" in err
        assert sum(sim.ledger.requests.values()) == 0


def test_failed_jobs_exit_1_with_their_reasons_in_status(
    example: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim(faults=FaultPlan(rates=FaultRates(job_failure=1.0)))) as sim:
        keyed(sim)
        code, out, _ = run(["run", str(example), *FAST], capsys)
    assert code == 1 and "failed:" in out
    code, out, _ = run(["status", str(example), "--json"], capsys)
    jobs = {j["id"]: j for j in json.loads(out)["jobs"]}
    assert jobs["alice"]["state"] == "failed" and jobs["alice"]["reason"]
    assert jobs["alice-portraits"]["state"] == "skipped" and "alice ended failed" in jobs["alice-portraits"]["reason"]


def test_plan_counts_and_sends_nothing(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", str(example)], capsys)
    assert code == 0
    assert re.search(r"submit now:\s+2", out) and re.search(r"wait for a checkpoint:\s+1", out)
    assert "nothing was sent" in out and not (example.parent / ".dreamlook-batch").exists()


def test_jobs_list_and_get_print_json_without_signatures(
    threaded_sim: Any, keyed: Any, example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        assert run(["run", str(example), *FAST], capsys)[0] == 0
        code, out, _ = run(["jobs", "list", "image-gen"], capsys)
        [listed] = json.loads(out)
        assert code == 0 and listed["job_type"] == "image_gen" and "X-Goog-Signature" not in out
        code, out, _ = run(["jobs", "get", "dreambooth", sim.ledger.jobs[0].job_id], capsys)
        assert code == 0 and json.loads(out)["state"] == "success" and "Signature" not in out
        code, _, err = run(["jobs", "get", "dreambooth", "db_nope"], capsys)
        assert code == 1 and "no such dreambooth job db_nope" in err
        # The id is one path segment: what follows a `?` or a `/` in it is not a query or a path.
        for typed in (f"{sim.ledger.jobs[0].job_id}?x=1", f"x/../{sim.ledger.jobs[0].job_id}"):
            code, out, err = run(["jobs", "get", "dreambooth", typed], capsys)
            assert code == 1 and out == "" and "no such dreambooth job" in err, (typed, out)


@pytest.mark.broad  # left out of `make mutants` (time): see bench/MUTANTS.md
def test_simulate_rehearses_from_a_fresh_state_and_refuses_once(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["run", str(example), "--simulate"], capsys)[0] == 0
    assert (example.parent / ".dreamlook-batch" / "example.simulated.db").exists()
    assert not (example.parent / ".dreamlook-batch" / "example.db").exists()
    assert run(["run", str(example), "--simulate"], capsys)[0] == 0  # a rerun starts over cleanly
    code, _, err = run(["run", str(example), "--simulate", "--once"], capsys)
    assert code == 2 and "dreamlook-batch sim" in err


def test_the_docs_curl_examples_work_against_the_sim_command(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    sim = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sim", "--port", "0", "--time-scale", "100000", "--small-files"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sim.stdout is not None
        url = sim.stdout.readline().split(" at ")[1].strip()
        key = SimSettings().api_keys[0]
        auth = ["-H", "content-type: application/json", "-H", f"authorization: Bearer {key}"]
        # The docs' dry run example, host changed.
        body = json.dumps(
            {
                "steps": 1200,
                "learning_rate": 0.000001,
                "instance_prompt": "photo of ukj person",
                "base_model": "stable-diffusion-v1-5",
                "saved_model_weights_format": "safetensors",
                "dry_run": True,
                "image_urls": ["https://example.com/1.jpg"],
            }
        )
        dry = json.loads(subprocess.check_output(["curl", "-sS", f"{url}/dreambooth", *auth, "--data-raw", body]))
        assert dry["job_id"].startswith("TEST_")
        real = json.loads(
            subprocess.check_output(
                [
                    "curl",
                    "-sS",
                    f"{url}/dreambooth",
                    *auth,
                    "--data-raw",
                    body.replace('"dry_run": true', '"steps": 100'),
                ]
            )
        )
        job = json.loads(subprocess.check_output(["curl", "-sS", *auth, f"{url}/jobs/dreambooth/{real['job_id']}"]))
        assert job["job_id"] == real["job_id"] and job["job_type"] == "dreambooth"
        listed = json.loads(subprocess.check_output(["curl", "-sS", *auth, f"{url}/jobs/dreambooth"]))
        assert [j["job_id"] for j in listed] == [real["job_id"]]
    finally:
        sim.terminate()
        sim.wait(10)
