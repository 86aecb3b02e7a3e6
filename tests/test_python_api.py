"""The Python API as a service or a notebook uses it: a campaign built in memory (dicts and typed
specs) runs inside the test's own event loop against the simulator, its events arrive as they
happen, and the result, the files on disk and the simulator's ledger agree. A bad in-memory job
gets the messages a manifest would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import Campaign, Event, ExitCode, JobSpec, JobState, JobType, ManifestError, StopReason
from orchestrator.events import check_json
from orchestrator.manifest.load import load_manifest
from orchestrator.sim import Simulator

from .campaigns import assert_campaign_on_disk
from .conftest import ROOT, fast_run, fast_sim, until, write

pytestmark = pytest.mark.anyio
HANG_S = 60
IMAGES = ["https://example.com/1.jpg", "https://example.com/2.jpg"]


def jobs() -> list[dict[str, Any] | JobSpec]:
    return [
        {
            "id": "ann",
            "type": "dreambooth",
            "instance_prompt": "photo of ann",
            "image_urls": IMAGES,
            "base_model": "stable-diffusion-v1-5",
            "download": ["lora"],
        },
        JobSpec(
            id="ann-portraits",
            type=JobType.IMAGE_GEN,
            checkpoint_from="ann",
            payload={"prompt": "ann", "num_samples": 2},
        ),
        {"id": "sky", "type": "image_gen", "prompt": "sky", "base_model": "stable-diffusion-v1-5"},
        JobSpec(id="sea", type=JobType.IMAGE_GEN, payload={"prompt": "sea", "base_model": "stable-diffusion-v1-5"}),
    ]


IDS = ["ann", "ann-portraits", "sky", "sea"]


def campaign_on(sim: Simulator, folder: Path, scale: float = 20_000.0, **options: Any) -> Campaign:
    key = write(folder / "key", sim.api_key + "\n")
    return Campaign.from_jobs(
        "mem", jobs(), folder=folder, settings=fast_run(scale), api_url=sim.url, api_key_file=key, **options
    )


def as_json_line(ev: Event) -> dict[str, Any]:
    """The event as the JSON log writes it: the same check applies to both."""
    level = {10: "debug", 20: "info", 30: "warning", 40: "error"}[ev.level]
    return {"ts": ev.ts, "level": level, "logger": "x", "message": ev.text(), **ev.to_json()}


async def test_a_campaign_built_in_memory_runs_in_the_callers_loop_and_tells_its_events(tmp_path: Path) -> None:
    async with Simulator(fast_sim()) as sim:
        campaign = campaign_on(sim, tmp_path)
        seen: list[Event] = []
        with anyio.fail_after(HANG_S):
            async with campaign.open() as run:
                async for ev in run.events:
                    seen.append(ev)
        result = run.result
        assert result.ok and result.exit_code == ExitCode.OK and result.stopped_by is None, result.problems
        assert result.counts == {JobState.DONE: 4} and result.problems == ()
        assert Path(result.out) == tmp_path / "outputs" / "mem"
        checked = assert_campaign_on_disk(sim, Path(result.out), "mem", IDS)  # each job paid once, bytes right
        assert result.files_done == checked == 1 + 2 + 1 + 1
    assert [w for ev in seen for w in check_json(as_json_line(ev))] == []
    names = [ev.name for ev in seen]
    assert sorted(ev.fields["job_id"] for ev in seen if ev.name == "job.submitted") == sorted(IDS)
    assert sorted(ev.fields["job_id"] for ev in seen if ev.name == "job.done") == sorted(IDS)
    assert names[-1] == "run.finished" and seen[-1].fields["exit_code"] == 0 and result.events_dropped == 0
    assert (tmp_path / ".dreamlook-batch" / "mem.db").exists()  # state where the CLI keeps it


async def test_run_once_is_one_pass_and_run_finishes_without_paying_twice(tmp_path: Path) -> None:
    async with Simulator(fast_sim(time_scale=2_000.0)) as sim:  # trainings of ~0.5 s: one pass cannot end them
        campaign = campaign_on(sim, tmp_path, 2_000.0)
        with anyio.fail_after(HANG_S):
            first = await campaign.run_once()
        assert first.exit_code == ExitCode.OK  # nothing failed so far
        assert first.counts.get(JobState.DONE, 0) < 4 and first.counts.get(JobState.PENDING)  # ann-portraits waits
        with anyio.fail_after(HANG_S):
            second = await campaign.run()
        assert second.ok and second.counts == {JobState.DONE: 4}
        assert_campaign_on_disk(sim, Path(second.out), "mem", IDS)


async def test_stop_finishes_what_is_in_flight_and_a_run_that_finished_everything_is_not_interrupted(
    tmp_path: Path,
) -> None:
    async with Simulator(fast_sim(time_scale=2_000.0)) as sim:
        campaign = campaign_on(sim, tmp_path, 2_000.0)
        told = False
        with anyio.fail_after(HANG_S):
            async with campaign.open() as run:
                async for ev in run.events:
                    if ev.name == "job.submitted" and not told:
                        run.stop()  # at the first submission: a POST in flight ends, nothing new starts
                        told = True
        stopped = run.result
        assert stopped.exit_code == ExitCode.INTERRUPTED and stopped.stopped_by is StopReason.INTERRUPTED
        assert stopped.counts.get(JobState.PENDING) and not stopped.counts.get(JobState.SUBMITTING)
        done: list[str] = []
        with anyio.fail_after(HANG_S):
            async with campaign.open() as run:
                async for ev in run.events:
                    if ev.name == "job.done":
                        done.append(ev.fields["job_id"])
                        if len(done) == len(IDS):
                            run.stop()  # told to stop with nothing left to do
        assert run.result.exit_code == ExitCode.OK and run.result.stopped_by is None
        assert_campaign_on_disk(sim, Path(run.result.out), "mem", IDS)


async def test_a_reader_that_lags_never_holds_the_run_up_and_is_told_what_it_missed(tmp_path: Path) -> None:
    async with Simulator(fast_sim()) as sim:
        campaign = campaign_on(sim, tmp_path)
        with anyio.fail_after(HANG_S):
            async with campaign.open(buffer=3) as run:
                await until(lambda: run.ended, HANG_S)  # reads nothing until the run has ended
                kept = [ev async for ev in run.events]
        assert run.result.ok and len(kept) == 3
        assert run.result.events_dropped > 0 and run.dropped == run.result.events_dropped


@pytest.mark.parametrize(
    "job",
    [
        {"id": "bad id!", "type": "image_gen", "prompt": "p", "base_model": "stable-diffusion-v1-5"},
        {"id": "a", "type": "image_gen", "prompt": "p", "base_model": "b", "dry_run": True},
        {"id": "a", "type": "image_gen", "prompt": "p", "checkpoint_from": "nobody"},
        {"id": "a", "type": "painting", "prompt": "p"},
        {"id": "a", "type": "image_gen", "prompt": 3, "num_samples": "two"},
    ],
)
async def test_a_bad_job_in_memory_gets_the_manifests_messages(tmp_path: Path, job: dict[str, Any]) -> None:
    manifest = write(tmp_path / "m.yaml", "campaign: mem\njobs:\n  - " + json.dumps(job) + "\n")
    with pytest.raises(ManifestError) as from_file:
        load_manifest(manifest)
    with pytest.raises(ManifestError) as in_memory:
        Campaign.from_jobs("mem", [job], folder=tmp_path)
    assert [(p.job_id, p.message) for p in in_memory.value.problems] == [
        (p.job_id, p.message) for p in from_file.value.problems
    ]
    assert all(str(p).startswith("jobs given in Python:1:") for p in in_memory.value.problems)


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From Python", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the From Python section has a python example"
    script = write(tmp_path / "example.py", code.group(1))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: alice-portraits 2 files" in done.stdout and "OK {'done': 2} 3 files" in done.stdout
    assert (tmp_path / "outputs" / "portraits" / "alice-portraits" / "SHA256SUMS").exists()
