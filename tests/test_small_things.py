"""Small things a user notices, through the real command line against the simulator: an
empty key file, an empty state file, `settle` and `jobs get` of a job that does not exist, a
job removed from the manifest after it was paid for (still fetched, listed and counted
apart), and the report's prompts, seeds and training settings."""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator import load_manifest, paths_for
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import JobState
from orchestrator.run.outcome import ExitCode, RunOutcome
from orchestrator.sim import FaultPlan, FaultRates
from orchestrator.store import SqliteDb

from . import test_cli
from .conftest import cli_process, fast_sim, write
from .test_cli import FAST, run

# The command-line tests' fixtures: a copy of jobs/example.yaml; the simulator's key and URL in the environment.
example, keyed = test_cli.example, test_cli.keyed


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


def _image_job(job_id: str, prompt: str) -> str:
    return (
        f"  - id: {job_id}\n    type: image_gen\n    base_model: stable-diffusion-v1-5\n"
        f"    prompt: {prompt}\n    num_samples: 2\n"
    )


def test_a_job_removed_after_it_was_paid_for_is_still_fetched_and_listed_apart(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    head = "campaign: shrink\njobs:\n"
    manifest = write(tmp_path / "shrink.yaml", head + _image_job("a", "a castle"))
    out = tmp_path / "outputs" / "shrink"
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        assert run(["run", str(manifest), *FAST], capsys)[0] == 0
        # b is submitted (paid for), d never is (the spending guard); then both leave the manifest.
        write(manifest, head + _image_job("a", "a castle") + _image_job("b", "a boat") + _image_job("d", "a dog"))
        code, _, _ = run(["run", str(manifest), "--once", "--max-new-jobs", "1", *FAST], capsys)
        assert code == 0 and [e.tags for e in sim.ledger.jobs][-1] == [{"key": "dreamlook-batch", "value": "shrink/b"}]
        write(manifest, head + _image_job("a", "a castle"))
        code, out_text, _ = run(["plan", str(manifest)], capsys)  # the manifest as it is now, before a run
        assert code == 0 and "not in the manifest any more, still followed and fetched (paid for): b\n" in out_text
        # Its files cannot be fetched in this run: the run does not end 0 as if all were there. (A
        # process of its own, with a deadline: a run that waited for the removed `d` would never end.)
        sim.set_faults(FaultPlan(rates=FaultRates(reset_download=1.0)))
        proc = cli_process(manifest, sim)
        try:
            out_text, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()  # (a no-op once it has ended)
        assert proc.returncode == 1, out_text
        assert "1 job(s) not in the manifest any more (1 downloading)" in out_text
        code, out_text, _ = run(["status", str(manifest)], capsys)
        assert code == 0 and "1 jobs: 1 done; 1 not in the manifest any more (1 downloading)" in out_text
        [row_b] = [line for line in out_text.splitlines() if line.startswith("│ b ")]
        assert "downloading" in row_b and "│ not in the" in row_b  # the reason column starts with the mark
        assert "│ d " not in out_text  # never sent: dropped as the manifest says
        sim.set_faults(FaultPlan())
        code, out_text, _ = run(["run", str(manifest), *FAST], capsys)
        assert code == 0, out_text
        assert "run finished" in out_text and "1 done (" in out_text  # the manifest's own jobs
        assert "1 job(s) not in the manifest any more (1 done): paid for, so still followed and fetched" in out_text
        remote_b = next(e.job_id for e in sim.ledger.jobs if e.tags[0]["value"] == "shrink/b")
        expected = sim.expected_files(remote_b)
        assert len(sim.ledger.jobs) == 2  # b was never paid for twice, d never at all
    lines = (out / "b" / "SHA256SUMS").read_text().splitlines()
    sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines)}
    assert sums == expected and len(sums) == 2
    for name, digest in sums.items():
        assert hashlib.sha256((out / "b" / name).read_bytes()).hexdigest() == digest
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 1} and summary["not_in_manifest"] == {"done": 1}
    assert summary["done"] is True
    assert [(j["id"], j.get("in_manifest", True), j.get("note")) for j in summary["jobs"]] == [
        ("a", True, None),
        ("b", False, "not in the manifest any more"),
    ]
    code, out_text, _ = run(["status", str(manifest), "--json"], capsys)
    assert code == 0 and json.loads(out_text)["not_in_manifest"] == {"done": 1}
    code, out_text, _ = run(["status", str(manifest)], capsys)
    assert "1 jobs: 1 done; 1 not in the manifest any more (1 done)" in out_text
    assert run(["report", str(manifest)], capsys)[0] == 0
    page = (out / "report.html").read_text()
    assert re.search(r"<tr class='removed[^']*' data-job='b'.*not in the manifest any more", page)


def test_the_report_shows_each_pictures_prompt_and_seed_and_each_checkpoints_training(
    example: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = 'portrait of <b>ukj</b> & "friends"'
    text = example.read_text().replace(
        "    prompt: portrait of ukj person, studio light\n", f"    prompt: '{hostile}'\n    seed: 1234\n"
    )
    # alice also keeps the checkpoint saved halfway (an intermediate one), on another base model
    text = text.replace(
        "    download: [checkpoint, lora]\n",
        "    download: [checkpoint, lora, intermediate]\n    save_checkpoints_at: [600]\n"
        "    base_model: realistic-vision-v5-1\n",
    )
    write(example, text)
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        assert run(["run", str(example), *FAST], capsys)[0] == 0
    assert run(["report", str(example)], capsys)[0] == 0
    out = example.parent / "outputs" / "example"
    page = (out / "report.html").read_text()
    figures = re.findall(r"<figure><a href='([^'/]+)/([^']+)'>.*?<figcaption>(.*?)</figcaption></figure>", page)
    by_job: dict[str, dict[str, str]] = {}
    for job, name, caption in figures:
        by_job.setdefault(job, {})[name] = caption
    # the prompt, escaped, and the seed each picture was made with (the manifest's 1234, + 1 each)
    portraits = by_job["alice-portraits"]
    escaped = "portrait of &lt;b&gt;ukj&lt;/b&gt; &amp; &quot;friends&quot;"
    assert len(portraits) == 4 and all(
        c.startswith(f"<span class=prompt>{escaped}</span><br>") for c in portraits.values()
    )
    assert sorted(re.sub(r".*seed (\d+)</span>$", r"\1", c) for c in portraits.values()) == [
        "1234",
        "1235",
        "1236",
        "1237",
    ]
    assert "<b>ukj</b>" not in page
    # a combined job: each picture under the prompt of its own image_gen entry, with its seed
    job = json.loads((out / "bob-all-in-one" / "job.json").read_text())
    prompts = ["zwx person as an astronaut", "zwx person, oil painting"]
    expected = {
        image["url"].rsplit("/", 1)[-1]: f"<span class=prompt>{html.escape(prompts[group['config_idx']])}</span>"
        f"<br><span class=seed>seed {image['seed']}</span>"
        for group in job["image_gen_results"]
        for image in group["generated_images"]
    }
    assert by_job["bob-all-in-one"] == expected and len(expected) == 4
    # each checkpoint with the base model and steps its training was sent with
    rows = re.findall(
        r"<tr data-file='[^']+'><td>([^<]+)</td>.*?<td class=base>([^<]*)</td><td class=steps>([^<]*)", page
    )
    assert sorted(rows) == [
        ("alice", "realistic-vision-v5-1", "1200"),
        ("alice", "realistic-vision-v5-1", "1200"),
        ("alice", "realistic-vision-v5-1", "600 of 1200"),
        ("bob-all-in-one", "stable-diffusion-v1-5", "1200"),
    ]


def test_settle_resubmit_of_a_job_no_longer_in_the_manifest_is_refused(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A state whose `alice` was sent and left unknown (through the store's own verbs), then the
    # manifest without alice (and without the job that needs its checkpoint).
    manifest = load_manifest(example)
    db = SqliteDb(paths_for(manifest).state)
    try:
        db.sync_manifest("example", manifest.jobs, [spec_fingerprint(s) for s in manifest.jobs], 1.0)
        db.record_intents([("alice", "{}", spec_fingerprint(manifest.by_id["alice"]))], 2.0)
        db.move("alice", JobState.UNKNOWN, 3.0, reason="unknown whether it was created")
    finally:
        db.close()
    text = example.read_text()
    write(example, text[: text.index("  - id: alice\n")] + text[text.index("  - id: bob-all-in-one\n") :])
    code, _, err = run(["settle", str(example), "alice", "--resubmit"], capsys)
    assert code == 2 and "job 'alice' is not in the manifest any more: --resubmit would leave it pending" in err
    code, out, _ = run(["settle", str(example), "alice", "--give-up"], capsys)
    assert code == 0 and "alice: marked failed" in out


def test_what_a_removed_job_does_to_a_runs_exit_code() -> None:
    done = {JobState.DONE: 2}
    # still to fetch, or unknown (it may exist and hold files: a person settles it): not 0
    assert RunOutcome(done, None, removed={JobState.DOWNLOADING: 1}).exit_code == ExitCode.FAILED
    assert RunOutcome(done, None, removed={JobState.UNKNOWN: 1}).exit_code == ExitCode.FAILED
    assert RunOutcome(done, None, once=True, removed={JobState.UNKNOWN: 1}).exit_code == ExitCode.FAILED
    # a cron pass with one still at the service: nothing has failed so far
    assert RunOutcome(done, None, once=True, removed={JobState.RUNNING: 1}).exit_code == ExitCode.OK
    # its other endings: the manifest no longer asks for it
    ended = {JobState.DONE: 1, JobState.FAILED: 1, JobState.LOST: 1}
    assert RunOutcome(done, None, removed=ended).exit_code == ExitCode.OK
