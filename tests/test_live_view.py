"""The live view as a user sees it: the real CLI in a real pseudo-terminal, mid-run, against
the simulator with trainings slow enough to watch and downloads that break and resume."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from orchestrator.api.jobs import parse_job
from orchestrator.events import Event
from orchestrator.live import job_cells, sentence
from orchestrator.run.outcome import JobProgress
from orchestrator.run.schedule import remaining_s
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, SimSettings

from .conftest import ROOT, in_terminal, write

SCALE = 20  # a 100-step training (110 service seconds) runs about 5 real seconds
IDS = [f"subject-portrait-campaign-2026-alpha-{n:04d}" for n in (1, 2)]  # 41 characters, a common prefix
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
FILE_ROW = re.compile(r"(\d+(?:\.\d)?) (B|kB|MB|GB) / (\d+(?:\.\d)?) (B|kB|MB|GB)\s+(\d+)%")
JOB_ROW = re.compile(r"(\S+)\s+dreambooth\s+running\s+[█░]+\s+(\d+)%\s+ends (?:in|any)")


def slow_sim() -> SimSettings:
    """Trainings of a few real seconds; files of MBs at 2 MB/s a connection, broken off midway
    (they resume: their bytes must not count twice)."""
    return SimSettings(
        time_scale=SCALE,
        retention_s=1e9,
        checkpoint_bytes=6_000_000 + 17,
        lora_bytes=1_500_000 + 3,
        image_max_px=24,
        download_bytes_per_s=2e6,
        # The first download arrives wrong after its middle (found out, fetched again from the start);
        # eight after it break midway (whole files and ranges) and resume.
        faults=FaultPlan(
            script=(
                ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.GARBLE, nth=1),
                ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.RESET, nth=2, count=8),
            )
        ),
    )


def run_in_terminal(manifest: Path, sim: Any, columns: int = 120) -> tuple[int, str]:
    """`dreamlook-batch run` against `sim` in a pseudo-terminal of `columns` columns."""
    # Large files in ranges of 1 MiB over several connections: a broken range's bytes come again.
    args = ["run", str(manifest), "--api-url", sim.url, "--time-scale", str(SCALE)]
    args += ["--parallel-min-mb", "2", "--range-mb", "1"]
    env = {"COLUMNS": str(columns), "LINES": "50", "TERM": "xterm-256color", "DREAMLOOK_API_KEY": sim.api_key}
    return in_terminal(args, ROOT, env)


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_mid_run_the_view_shows_training_progress_and_no_file_past_its_size(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = write(
        tmp_path / "watch.yaml",
        "campaign: watch\n"
        "defaults:\n"
        "  dreambooth: {base_model: stable-diffusion-v1-5, steps: 100, instance_prompt: p, image_urls: [u]}\n"
        "jobs:\n" + "".join(f"  - {{id: {job_id}, type: dreambooth}}\n" for job_id in IDS),
    )
    with threaded_sim(slow_sim()) as sim:
        code, screen = run_in_terminal(manifest, sim)
        faults = [d.fault for d in sim.ledger.downloads if d.fault]
    text = plain(screen)
    assert code == 0, text[-3000:]
    # Training progress, mid-run: a job at the service with the API's percentage and its predicted end.
    trainings = [(job, int(pct)) for job, pct in JOB_ROW.findall(text)]
    assert trainings, text[-3000:]
    assert {job for job, _ in trainings} <= set(IDS)  # whole ids, never cut
    assert all(0 <= pct <= 99 for _, pct in trainings)  # only the API says a job ended
    assert "the jobs at the service should end in ~" in text  # the campaign's predicted end
    # Files: bytes on hand never past the size, the share never past 100%, though downloads broke.
    rows = FILE_ROW.findall(text)
    assert rows, text[-3000:]
    for done, done_unit, total, total_unit, share in rows:
        assert float(done) * UNITS[done_unit] <= float(total) * UNITS[total_unit] and int(share) <= 100, rows
    assert faults == ["garble"] + ["reset"] * 8  # downloads went wrong midway (and were fetched again)
    # Events are sentences; the speed has one definition, said on screen.
    assert f"{IDS[0]} submitted (remote id " in text
    assert "job.submitted" not in text and "job_id=" not in text
    assert "speeds: bytes received in the last 3 s" in text
    assert "run finished in" in text and "2 done" in text
    for job_id in IDS:
        assert (tmp_path / "outputs" / "watch" / job_id / "SHA256SUMS").exists()


def ev(name: str, **fields: Any) -> Event:
    return Event(name, logging.INFO, fields, ts=0.0)


def test_events_become_sentences_and_unknown_ones_stay_readable() -> None:
    assert sentence(ev("job.submitted", job_id="alice", state="submitted", remote_id="db_1")) == (
        "alice submitted (remote id db_1)"
    )
    assert sentence(ev("file.done", job_id="alice", file="model.safetensors", bytes=2_000_000)) == (
        "alice: model.safetensors saved (2.0 MB)"
    )
    assert sentence(ev("file.requeued", job_id="alice", file="m.bin", reason="Connection reset by peer")) == (
        "m.bin (alice) failed: Connection reset by peer; it is fetched again"
    )
    assert sentence(ev("job.problem", job_id="bob", state="failed", reason="failed: the API reports failure")) == (
        "bob: failed: the API reports failure"
    )
    retry = ev("api.retry", what="list dreambooth", attempt=2, wait_s=1.5, reason="HTTP 503: busy")
    assert sentence(retry) == "list dreambooth: attempt 2 failed (HTTP 503: busy); again in 1.5 s"
    broke = ev(
        "download.retry",
        what="m.bin",
        attempt=1,
        wait_s=0.01,
        reason="m.bin: transfer broke (ClientPayloadError) from http://storage.example/models/m.bin?<redacted>",
    )
    assert sentence(broke) == "m.bin: attempt 1 failed (transfer broke (ClientPayloadError)); again at once"
    unknown = ev("job.unknown_state", job_id="a", state="queued", remote_id="db_1", remote_state="paused")
    assert sentence(unknown) == "a: the API reports a state it does not document (paused)"
    assert sentence(ev("campaign.adopted", count=0, checked=3)) is None  # nothing happened: nothing told
    # An event the view has no sentence for (or whose fields changed): its words, not key=value.
    assert sentence(ev("disk.low_space", free_mb=12, where="/tmp")) == "disk low space: free mb 12, where /tmp"
    assert sentence(ev("job.submitted", job="alice")) == "job submitted: job alice"


def test_a_percentage_the_api_could_not_mean_is_no_reading_and_the_view_says_so() -> None:
    def running(pct: object) -> Any:
        return parse_job({"job_id": "db_1", "state": "running", "percentage_done": pct, "running_duration": 30})

    for odd in (None, "50", 150, -3, float("nan"), float("inf"), True):
        job = running(odd)
        assert job.percentage_done is None, odd
        assert remaining_s(job, age_s=40, typical_s=None) is None  # no reading, no similar jobs: no end
    assert remaining_s(running(None), age_s=40, typical_s=100) == 60  # from what similar jobs took
    assert running(25).percentage_done == 25 and remaining_s(running(25), age_s=40, typical_s=None) == 90
    unknown = JobProgress(
        job_id="a", type="dreambooth", running=True, percentage=None, pace=None, seen_at=0, ends_at=None
    )
    assert job_cells(unknown, now=5) == ("running", "", "", "end not known yet")
    # Carried forward at its pace between looks, never to 100%: only the API says a job ended.
    seen = JobProgress(job_id="a", type="dreambooth", running=True, percentage=50, pace=1.0, seen_at=0, ends_at=50)
    assert job_cells(seen, now=10)[2:] == ("60%", "ends in ~40s")
    assert job_cells(seen, now=500)[2:] == ("99%", "ends any moment now")
