"""Small things a user notices, through the real command line: an empty key file, an empty
state file, `settle` of a job that does not exist, `jobs get` of a job that does not exist."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main

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


def test_an_empty_key_file_says_it_is_empty_not_to_set_the_variable(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)  # a key in the environment too: the file was asked for, so the file is what counts
        for text, said in (("", "is empty"), ("  \n\n", "holds only whitespace")):
            key_file = write(tmp_path / "key", text)
            code, _, err = run(["jobs", "list", "dreambooth", "--api-key-file", str(key_file)], capsys)
            assert code == 2
            assert f"the API key file {key_file} {said}; it must hold the key" in err
            assert "set DREAMLOOK_API_KEY" not in err
        assert sum(sim.ledger.requests.values()) == 0


def test_an_empty_state_file_is_refused_by_every_command_and_left_as_it_is(
    example: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    state = example.parent / ".dreamlook-batch" / "example.db"
    code, _, err = run(["status", str(example)], capsys)
    assert code == 1 and "no state yet" in err  # missing: nothing has run
    write(state, "")
    for command in (["status", str(example)], ["status", str(example), "--json"], ["plan", str(example)]):
        code, out, err = run(command, capsys)
        assert code == 1, command
        assert f"{state} is empty (0 bytes): not a state file" in err and "remove it" in err
        assert "0 jobs" not in out
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        code, _, err = run(["run", str(example), *FAST], capsys)
        assert code == 2 and "is empty (0 bytes)" in err and "Nothing was sent" in err
        assert sum(sim.ledger.requests.values()) == 0 and sim.ledger.jobs == []
    assert state.stat().st_size == 0  # never taken for a new state: nothing written into it


def test_settle_names_a_missing_job_and_a_job_that_is_not_unknown(
    example: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["settle", str(example), "alice", "--give-up"], capsys)
    assert code == 1 and "no state yet" in err
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        assert run(["run", str(example), *FAST], capsys)[0] == 0
    code, _, err = run(["settle", str(example), "nosuch", "--give-up"], capsys)
    assert code == 1 and "no such job 'nosuch' in campaign 'example'" in err
    assert "not unknown" not in err
    code, _, err = run(["settle", str(example), "alice", "--resubmit"], capsys)
    assert code == 1 and "job 'alice' is done, not unknown" in err
    code, out, _ = run(["status", str(example), "--json"], capsys)
    assert '"state": "done"' in out  # nothing changed


def test_jobs_get_of_a_missing_job_exits_1_saying_no_such_job(
    threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        code, out, err = run(["jobs", "get", "dreambooth", "db_nope"], capsys)
        assert code == 1 and out == ""
        assert f"no such dreambooth job db_nope at {sim.url}" in err
        code, _, err = run(["jobs", "get", "image-gen", "ig_nope"], capsys)
        assert code == 1 and "no such image_gen job ig_nope" in err
