"""Failures a user meets: each gives a clear message naming what failed and where, the
right exit code, and loses nothing. No traceback, no key in any output."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main

from .conftest import fast_sim, write

FAST = ["--max-active", "50", "--submit-rate", "500", "--requests-per-s", "2000", "--time-scale", "20000"]
IMAGE_JOB = "{id: g0, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5, num_samples: 2}"
KEY_CHARS = "s3cr3t-key-value"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return code, text


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write(tmp_path / "one.yaml", f"campaign: one\njobs:\n  - {IMAGE_JOB}\n")


def state(folder: Path, campaign: str = "one") -> dict[str, str]:
    with sqlite3.connect(folder / ".dreamlook-batch" / f"{campaign}.db") as db:
        return dict(db.execute("SELECT id, state FROM jobs").fetchall())


# -- input files ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_a_manifest_that_is_not_utf8_names_its_line_and_exits_2(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"campaign: x\njobs:\n  - {id: a, type: image_gen, prompt: caf\xe9, base_model: b}\n")
    code, text = run([command, str(latin)], capsys)
    assert code == 2
    assert f"{latin}:3: not UTF-8 text: byte 0xe9 at column 41" in text and "save the file as UTF-8" in text


def test_bulk_rows_and_json_lines_that_are_not_utf8_name_their_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rows.csv").write_bytes(b"n,p\na,fine\nb,caf\xe9\n")
    bulk = write(
        tmp_path / "bulk.yaml",
        "bulk:\n  - rows: rows.csv\n    template: {id: '{n}', type: image_gen, prompt: '{p}', base_model: b}\n",
    )
    code, text = run(["validate", str(bulk)], capsys)
    assert code == 2 and f"{tmp_path / 'rows.csv'}:3: not UTF-8 text: byte 0xe9 at column 6" in text
    lines = tmp_path / "l.jsonl"
    lines.write_bytes(b'{"id": "a", "type": "image_gen"}\n{"id": "b\xff"}\n')
    code, text = run(["validate", str(lines)], capsys)
    assert code == 2 and f"{lines}:2: not UTF-8 text: byte 0xff" in text


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_a_folder_or_a_missing_file_as_manifest_is_named_as_such(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run([command, str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path}: is a folder, not a manifest: name the file itself" in text
    code, text = run([command, str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and f"{tmp_path / 'nope.yaml'}: no such file" in text


def test_bulk_rows_that_are_a_folder_are_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rows.csv").mkdir()
    bulk = write(tmp_path / "bulk.yaml", "bulk:\n  - rows: rows.csv\n    template: {id: '{n}', type: image_gen}\n")
    code, text = run(["validate", str(bulk)], capsys)
    assert code == 2 and f"{tmp_path / 'rows.csv'}: is a folder, not a CSV file" in text


# -- the state path ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "status", "report", "run"])
def test_a_state_path_that_cannot_hold_a_state_file_exits_2_and_says_why(
    manifest: Path, command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DREAMLOOK_API_KEY", "k")
    monkeypatch.setenv("DREAMLOOK_API_URL", "http://127.0.0.1:9")  # never reached
    folder = manifest.parent / "a-folder"
    folder.mkdir()
    code, text = run([command, str(manifest), "--state", str(folder)], capsys)
    assert code == 2 and f"--state {folder}: is a folder" in text and f"--state {folder / 'one.db'}" in text
    under_a_file = manifest / "state.db"  # the manifest is a file: nothing can live under it
    code, text = run([command, str(manifest), "--state", str(under_a_file)], capsys)
    assert code == 2 and f"{manifest} is a file, not a folder" in text
    assert not (manifest.parent / "outputs").exists() and not (manifest.parent / ".dreamlook-batch").exists()


def test_a_state_file_that_is_not_a_database_is_named(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("plan", "status", "report"):
        code, text = run([command, str(manifest), "--state", str(manifest)], capsys)
        assert code == 1 and f"cannot open the state store {manifest}: file is not a database" in text


# -- the API key ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "said"),
    [
        (f"{KEY_CHARS}\n{KEY_CHARS}", "a line break at position 17"),
        (f"{KEY_CHARS}\r\nx", "a line break at position 17"),
        (f"{KEY_CHARS} x", "a space at position 17"),
        (f"{KEY_CHARS}\x07", "a character that is not printable ASCII at position 17"),
        (f"{KEY_CHARS}é", "a character that is not printable ASCII at position 17"),
    ],
)
def test_a_key_with_a_line_break_or_odd_character_is_refused_without_printing_it(
    manifest: Path, key: str, said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DREAMLOOK_API_URL", "http://127.0.0.1:9")  # never reached
    monkeypatch.setenv("DREAMLOOK_API_KEY", key)
    code, text = run(["jobs", "list", "image_gen"], capsys)
    assert code == 2 and f"DREAMLOOK_API_KEY holds {said} of the key" in text
    assert KEY_CHARS not in text
    key_file = manifest.parent / "key"
    key_file.write_text(key + "\n", encoding="utf-8")
    monkeypatch.delenv("DREAMLOOK_API_KEY")
    code, text = run(["jobs", "list", "image_gen", "--api-key-file", str(key_file)], capsys)
    assert code == 2 and f"the API key file {key_file} holds {said}" in text
    assert KEY_CHARS not in text


def test_a_key_file_ending_in_a_newline_works_and_a_run_with_a_broken_key_sends_nothing(
    manifest: Path, threaded_sim: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with threaded_sim(fast_sim()) as sim:
        key_file = write(manifest.parent / "key", f"{sim.api_key}\r\n")
        code, text = run(["jobs", "list", "image_gen", "--api-url", sim.url, "--api-key-file", str(key_file)], capsys)
        assert code == 0, text
        assert sim.ledger.requests["list"] == 1
        monkeypatch.setenv("DREAMLOOK_API_KEY", f"{sim.api_key}\n{sim.api_key}")
        code, text = run(["run", str(manifest), "--api-url", sim.url, *FAST], capsys)
        assert code == 2 and "DREAMLOOK_API_KEY holds a line break" in text and sim.api_key not in text
        assert sim.ledger.requests["list"] == 1 and sim.ledger.jobs == []


# -- a full disk while writing job.json, SHA256SUMS, summary.json -------------------------


def full_disk_at(path: Path) -> Path:
    """The atomic writer's temporary name for `path`, pointed at /dev/full: every write
    there fails with ENOSPC, as on a full disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.symlink_to("/dev/full")
    return tmp


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("name", ["job.json", "SHA256SUMS"])
def test_a_full_disk_writing_a_jobs_record_keeps_it_downloading_and_the_next_run_finishes(
    manifest: Path, name: str, threaded_sim: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(manifest, f"campaign: one\njobs:\n  - {IMAGE_JOB}\n  - {IMAGE_JOB.replace('g0', 'g1')}\n")
    out = manifest.parent / "outputs" / "one"
    blocked = full_disk_at(out / "g0" / name)
    with threaded_sim(fast_sim()) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        code, text = run(["run", str(manifest), "--api-url", sim.url, *FAST], capsys)
        assert code == 1
        assert f"cannot write {out / 'g0' / name}: No space left on device (the disk is full" in " ".join(text.split())
        assert "the job stays downloading and the next run finishes it" in " ".join(text.split())
        # Only that job waits: the other one, whose disk space was there, is done.
        assert state(manifest.parent) == {"g0": "downloading", "g1": "done"}
        assert not blocked.exists() and not blocked.is_symlink()  # the temporary file is cleaned up
        assert sorted(p.name for p in (out / "g0").glob("*.png")) and not (out / "g0" / "SHA256SUMS").exists()
        code, text = run(["run", str(manifest), "--api-url", sim.url, *FAST], capsys)
        assert code == 0, text
        assert sim.ledger.requests["submit"] == 2  # nothing paid twice
        remote_of = {e.tags[-1]["value"]: e.job_id for e in sim.ledger.jobs}
        expected = sim.expected_files(remote_of["one/g0"])
    assert state(manifest.parent) == {"g0": "done", "g1": "done"}
    sums = {
        name: digest
        for digest, name in (line.split("  ", 1) for line in (out / "g0" / "SHA256SUMS").read_text().splitlines())
    }
    assert sums == expected and json.loads((out / "g0" / "job.json").read_text())["state"] == "success"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_writing_the_summary_exits_1_and_the_previous_summary_stays_whole(
    manifest: Path, threaded_sim: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = manifest.parent / "outputs" / "one"
    with threaded_sim(fast_sim()) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        assert run(["run", str(manifest), "--api-url", sim.url, *FAST], capsys)[0] == 0
        before = (out / "summary.json").read_bytes()
        full_disk_at(out / "summary.json")
        code, text = run(["run", str(manifest), "--api-url", sim.url, "--once"], capsys)
        assert code == 1
        said = " ".join(text.split())
        assert f"error: cannot write {out / 'summary.json'}: No space left on device" in said
        assert "free some space and run again" in said
        assert (out / "summary.json").read_bytes() == before
        assert run(["run", str(manifest), "--api-url", sim.url, "--once"], capsys)[0] == 0
        assert sim.ledger.requests["submit"] == 1
    assert json.loads((out / "summary.json").read_text())["done"] is True
