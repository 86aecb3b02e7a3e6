"""The events are a contract: every line of a faulty run's JSON log is an event of the list
(`orchestrator.events.EVENTS`) with its fields and their types; the README's tables are that
list; plain logs quote what has spaces; no secret reaches either format."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from orchestrator import logs
from orchestrator.cli import main
from orchestrator.events import EVENTS, FIELD_TYPES, check_json, event, fields_table, markdown_table
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault

from .conftest import ROOT, fast_sim, write

FAST = ["--max-active", "2", "--submit-rate", "500", "--requests-per-s", "2000", "--time-scale", "20000"]
IMAGES = "image_urls: [https://example.com/1.jpg]"


def faulty_manifest(folder: Path) -> Path:
    """Two jobs alike (their lost answers make them unknown), a job the API refuses, a job that
    fails at the service, a dependent of a refused job (skipped), and jobs that succeed."""
    return write(
        folder / "faulty.yaml",
        "campaign: faulty\njobs:\n"
        f"  - {{id: twin-a, type: dreambooth, instance_prompt: same, {IMAGES}, base_model: stable-diffusion-v1-5}}\n"
        f"  - {{id: twin-b, type: dreambooth, instance_prompt: same, {IMAGES}, base_model: stable-diffusion-v1-5}}\n"
        f"  - {{id: refused, type: dreambooth, instance_prompt: r, {IMAGES}, base_model: sd-9000}}\n"
        "  - {id: after-refused, type: image_gen, prompt: p, checkpoint_from: refused}\n"
        "  - {id: fails, type: image_gen, prompt: f, base_model: stable-diffusion-v1-5}\n"
        "  - {id: fine-1, type: image_gen, prompt: one, base_model: stable-diffusion-v1-5, num_samples: 3}\n"
        "  - {id: fine-2, type: image_gen, prompt: two, base_model: stable-diffusion-v1-5, num_samples: 3}\n",
    )


def faulty_sim() -> Any:
    script = (
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST, nth=1),  # twin-a: created, answer lost
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.GHOST, nth=2),  # twin-b: alike: which is which?
        ScriptedFault(route=Route.SUBMIT, kind=FaultKind.FAIL_JOB, nth=4),  # `fails` (after `refused`)
        ScriptedFault(route=Route.GET, kind=FaultKind.SERVER_ERROR, nth=2, count=2),  # retried reads
        ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.RESET, nth=2),  # a retried download
    )
    # Image URLs that live 0.2 s, fetched one at a time at ~0.25 s each: renewed by a GET of the job.
    return fast_sim(
        list_echoes_tags=False,
        image_url_ttl_s=0.2 * 20_000,
        download_bytes_per_s=1_000.0,
        faults=FaultPlan(script=script),
    )


def test_every_line_of_a_faulty_runs_json_log_is_an_event_of_the_list(
    tmp_path: Path, threaded_sim: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = faulty_manifest(tmp_path)
    with threaded_sim(faulty_sim()) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        args = [
            "run",
            str(manifest),
            "--api-url",
            sim.url,
            "--reconcile-grace",
            "0.2",
            "--api-timeout",
            "0.5",
            "--max-downloads",
            "1",
            *FAST,
        ]
        code = main([*args, "--log-format", "json", "-v"])
        key = sim.api_key
    captured = capsys.readouterr()
    assert code == 1, captured.out  # failed, invalid, skipped and unknown jobs
    lines = [json.loads(line) for line in captured.err.splitlines()]  # every line is JSON: nothing else
    wrong = {f"{line['event']}: {w}" for line in lines for w in check_json(line)}
    assert not wrong, sorted(wrong)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    problems = {p["job_id"]: p for p in by_event["job.problem"]}
    # What a person needs to act: the job, its state, why, and the service's id where there is one.
    assert problems["refused"]["state"] == "invalid" and "base_model" in problems["refused"]["reason"]
    assert problems["fails"]["state"] == "failed" and problems["fails"]["remote_id"]
    assert {problems["twin-a"]["state"], problems["twin-b"]["state"]} == {"unknown"}
    assert "unknown whether it was created" in problems["twin-a"]["reason"]  # a reason with spaces, whole
    assert {e["job_id"] for e in by_event["job.submit_unclear"]} == {"twin-a", "twin-b"}
    assert {e["job_id"] for e in by_event["job.done"]} == {"fine-1", "fine-2"}
    assert all(isinstance(e["files"], int) and e["files"] == 3 for e in by_event["job.done"])  # numbers are numbers
    assert all(isinstance(e["bytes"], int) and e["bytes"] > 0 for e in by_event["file.done"])
    assert by_event["api.retry"] and all(isinstance(e["attempt"], int) for e in by_event["api.retry"])
    assert "download.url_renewed" in by_event, sorted(by_event)
    # The transfer layer knows files, not jobs: its events still name the job whose file it was.
    fetched = by_event["download.url_renewed"] + by_event["download.retry"]
    assert {e["job_id"] for e in fetched} <= {"fine-1", "fine-2"} and all("job_id" in e for e in fetched)
    [finished] = by_event["run.finished"]
    assert finished["exit_code"] == 1 and finished["counts"]["done"] == 2 and finished["counts"]["unknown"] == 2
    assert key not in captured.err and "X-Goog-Signature" not in captured.err


def test_check_json_refuses_what_the_list_does_not_say() -> None:
    """The checker the faulty run relies on: each of its refusals, once."""
    good = {
        "ts": 1.0,
        "level": "info",
        "event": "file.done",
        "logger": "orchestrator.run.download",
        "message": "file.done ...",
        "job_id": "a",
        "file": "x.png",
        "bytes": 3,
    }
    assert check_json(good) == []
    assert check_json({**good, "bytes": "3"}) == ["file.done: bytes='3' is not integer"]
    assert check_json({**good, "extra": 1}) == ["file.done: extra is not a field of this event"]
    assert check_json({k: v for k, v in good.items() if k != "file"}) == ["file.done: file missing"]
    assert check_json({**good, "event": "file.gone"}) == ["file.gone: not an event of the list"]
    assert check_json({**good, "level": "warning"}) == ["file.done: level warning, not info"]
    no_event = {**good, "event": "log", "logger": "orchestrator.run.download"}
    assert "orchestrator.run.download logged a line that is no event" in check_json(no_event)[0]
    library = {"ts": 1.0, "level": "warning", "event": "log", "logger": "aiohttp.client", "message": "m"}
    assert check_json(library) == []


def test_the_readme_lists_every_event_and_field_as_the_code_does() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "README's table of events differs: paste events.markdown_table()"
    assert fields_table() in readme, "README's table of fields differs: paste events.fields_table()"
    for spec in EVENTS.values():
        assert set(spec.required) | set(spec.optional) <= FIELD_TYPES.keys(), spec.name
        assert not (set(spec.required) | set(spec.optional)) & {"ts", "level", "event", "logger", "message"}


SECRET_URL = "https://storage.example/x.bin?X-Goog-Signature=abc123&X-Goog-Credential=me"
SECRET_KEY = "dl-0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_event_keeps_its_types_quotes_spaces_and_never_carries_a_secret(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure(log_format, 1)
    try:
        log = logging.getLogger("orchestrator.test")
        event(log, "job.problem", job_id="a", state="downloading", reason=f"{SECRET_URL} failed for {SECRET_KEY}")
        event(log, "file.done", job_id="a", file="x y.png", bytes=12)
    finally:
        logging.getLogger().handlers.clear()
    text = capsys.readouterr().err
    assert "abc123" not in text and "0123456789abcdef" not in text and "X-Goog-Credential" not in text
    if log_format == "json":
        problem, done = (json.loads(line) for line in text.splitlines())
        assert problem["reason"] == "https://storage.example/x.bin?<redacted> failed for dl-<redacted>"
        assert done["bytes"] == 12 and done["file"] == "x y.png"
        assert check_json(problem) == [] and check_json(done) == []
    else:
        assert 'reason="https://storage.example/x.bin?<redacted> failed for dl-<redacted>"' in text
        assert 'file.done job_id=a file="x y.png" bytes=12' in text


def test_a_manifests_warnings_and_errors_are_events_in_a_json_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With `--log-format json` stderr is JSON lines only: what `validate` finds is events too."""
    manifest = write(
        tmp_path / "m.yaml",
        "campaign: c\njobs:\n"
        "  - {id: odd, type: dreambooth, image_urls: [u], instance_prompt: p, steps: 5000}\n"
        "  - {id: bad, type: dreambooth, image_urls: [https://e.com/a.jpg], instance_prompt: p, steps: -5}\n",
    )
    code = main(["validate", str(manifest), "--log-format", "json"])
    captured = capsys.readouterr()
    assert code == 2
    lines = [json.loads(line) for line in captured.err.splitlines()]  # every line is JSON: nothing else
    assert not [w for line in lines for w in check_json(line)]
    warnings = [e for e in lines if e["event"] == "manifest.warning"]
    [error] = [e for e in lines if e["event"] == "manifest.error"]
    [rejected] = [e for e in lines if e["event"] == "manifest.rejected"]
    assert {e["job_id"] for e in warnings} == {"odd"} and all(e["file"] == str(manifest) for e in warnings)
    assert error["job_id"] == "bad" and error["line"] == 4 and "steps" in error["reason"]
    assert rejected["errors"] == 1
