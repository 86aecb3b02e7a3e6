"""summary.json and `status --json` are written from the store a page of jobs at a time
(issue 12: the end of a 100,000-job run must not hold the campaign). The text must be what
the in-memory code wrote before, byte for byte: `old_campaign_record` below is that code,
kept as the oracle, and every test compares against it on a real SQLite store."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import RunRequest, load_manifest, paths_for, run_campaign
from orchestrator.cli import main
from orchestrator.commands import status_json
from orchestrator.errors import StoreError
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import UNPAID, ArtifactKind, JobState
from orchestrator.output import SUMMARY_PAGE_JOBS, write_summary
from orchestrator.sim import FaultPlan, FaultRates, Simulator
from orchestrator.store import FileRow, JobRow, SqliteDb, SqliteStore

from .conftest import fast_run, fast_sim, write

NOW = 1_800_000_000.0
WINDOW_END = NOW + 90.5


def old_campaign_record(
    campaign: str, rows: Sequence[JobRow], files: Mapping[str, Sequence[FileRow]]
) -> dict[str, Any]:
    """The record as `output.campaign_record` built it before streaming (verbatim)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    return {
        "campaign": campaign,
        "counts": counts,
        "done": bool(rows) and all(r.state is JobState.DONE for r in rows) and not any(r.duplicate_ids for r in rows),
        "duplicates": {r.id: list(r.duplicate_ids) for r in rows if r.duplicate_ids},
        "jobs": [
            {
                "id": r.id,
                "type": r.type,
                "state": r.state.value,
                "remote_id": r.remote_id,
                "reason": r.reason,
                "percentage": r.percentage,
                "duplicate_remote_ids": list(r.duplicate_ids),
                "reconcile_after": r.reconcile_at if r.state is JobState.SUBMITTING else None,
                "files": [
                    {
                        "name": f.name,
                        "kind": f.kind.value,
                        "bytes": f.size_bytes,
                        "sha256": f.sha256,
                        "done": f.done,
                        "lost": f.lost,
                    }
                    for f in files.get(r.id, [])
                ],
            }
            for r in rows
        ],
    }


def old_record_of(store: SqliteDb, campaign: str) -> dict[str, Any]:
    rows, files = store.jobs(), store.files_by_job()
    record = old_campaign_record(campaign, [r for r in rows if r.in_manifest], files)
    # Jobs removed from the manifest after they were sent: listed after the others, marked and
    # counted apart; the campaign is not done while one of them is still followed.
    removed = [r for r in rows if not r.in_manifest and r.state not in UNPAID]
    if removed:
        apart = old_campaign_record(campaign, removed, files)
        record["jobs"] += [{**j, "in_manifest": False, "note": "not in the manifest any more"} for j in apart["jobs"]]
        record["not_in_manifest"] = apart["counts"]
        record["done"] = record["done"] and all(r.state.terminal and r.state is not JobState.UNKNOWN for r in removed)
    return record


def old_summary_text(store: SqliteDb, campaign: str, manifest: str) -> bytes:
    record = {**old_record_of(store, campaign), "manifest": manifest}
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def old_status_text(store: SqliteDb, campaign: str) -> str:
    return json.dumps(old_record_of(store, campaign), indent=2, sort_keys=True, default=str) + "\n"


def manifest_of(folder: Path, ids: Sequence[str]) -> Path:
    lines = ["campaign: sum", "jobs:"]
    lines += [f"- {{id: {i}, type: image_gen, prompt: p {i}, base_model: stable-diffusion-v1-5}}" for i in ids]
    return write(folder / "sum.yaml", "\n".join(lines) + "\n")


def sync(store: SqliteDb, manifest: Path) -> None:
    specs = load_manifest(manifest).jobs
    store.sync_manifest("sum", specs, [spec_fingerprint(s) for s in specs], NOW)


def image(job_id: str, n: int, name: str, *, size: int = 100) -> FileRow:
    return FileRow(
        job_id=job_id,
        remote_id=f"img-{job_id}-{n}",
        name=name,
        kind=ArtifactKind.IMAGE,
        size_bytes=size,
        sha256=None,
        done=False,
        lost=False,
    )


def summarize(path: Path, store: SqliteDb, **options: Any) -> None:
    """`write_summary` over the fixture's store: the run's own async verbs, on their worker thread."""
    anyio.run(partial(write_summary, path, "sum", SqliteStore(store), **options))


async def collected(chunks: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in chunks])


IN_MANIFEST = [f"j{i:02d}" for i in range(11)]
# The second manifest's order (not the ids' order) and two jobs dropped from it.
ORDER = ["j05", "j00", "j01", "j02", "j03", "j04", "j10", "j06", "j07", "j08", "j09"]


def build_campaign(folder: Path) -> Path:
    """Every state a summary shows, files done, pending and lost, a duplicate, lost answers,
    and two jobs (one done, one duplicate) that left the manifest, all through the store's verbs."""
    everyone = [*IN_MANIFEST, "j11", "j12"]
    manifest = manifest_of(folder, everyone)
    store = SqliteDb(paths_for(load_manifest(manifest)).state)
    try:
        sync(store, manifest)
        fingerprints = {s.id: spec_fingerprint(s) for s in load_manifest(manifest).jobs}
        sent = [j for j in everyone if j != "j06"]  # j06 stays pending
        store.record_intents([(j, json.dumps({"prompt": j}), fingerprints[j]) for j in sent], NOW)
        for j in ("j00", "j01", "j02", "j05", "j08", "j10", "j11", "j12"):
            store.mark_submitted(j, f"r-{j}", NOW)

        def finish(job_id: str, files: Sequence[FileRow], done: Sequence[int]) -> None:
            store.record_success(job_id, checkpoint_id=None, files=files, remote_state="success", now=NOW)
            for i in done:
                store.file_done(job_id, files[i].remote_id, f"{i:064x}", files[i].size_bytes or 0)
            if len(done) == len(files):
                store.move(job_id, JobState.DONE, NOW)

        # Names out of order: the record lists them by name.
        finish("j00", [image("j00", 0, "b.png", size=200), image("j00", 1, "a.png", size=3)], [0, 1])
        store.move("j01", JobState.FAILED, NOW, reason='the service said: "no"\nline two — ü')
        store.record_duplicates("j02", ["r-j02-copy", "r-j02-third"])
        finish("j02", [image("j02", 0, "x.png")], [0])
        store.record_attempt("j03", NOW, WINDOW_END)  # a lost answer in its grace window
        finish("j05", [image("j05", 0, "p.png"), image("j05", 1, "q.png")], [0])  # still downloading
        store.move("j05", JobState.DOWNLOADING, NOW)
        store.file_lost("j05", "img-j05-1")
        store.move("j07", JobState.UNKNOWN, NOW, reason="unknown whether it was created")
        store.update_remote("j08", remote_state="running", percentage=42.5, next_check_at=None, now=NOW)
        store.move("j08", JobState.RUNNING, NOW)
        store.move("j09", JobState.INVALID, NOW, reason="the API refused it (422)")
        finish("j10", [], [])
        finish("j11", [image("j11", 0, "gone.png", size=7000)], [0])
        store.record_duplicates("j12", ["r-j12-copy"])
    finally:
        store.close()
    return manifest_of(folder, ORDER)  # j11 and j12 leave the manifest; the next sync says so


@pytest.fixture
def built(tmp_path: Path) -> Iterator[tuple[Path, SqliteDb]]:
    manifest = build_campaign(tmp_path)
    store = SqliteDb(paths_for(load_manifest(manifest)).state)
    sync(store, manifest)
    yield manifest, store
    store.close()


@pytest.mark.parametrize("page_size", [1, 3, 4, 11, SUMMARY_PAGE_JOBS])
def test_summary_json_is_the_old_text_byte_for_byte_at_any_page_size(
    tmp_path: Path, built: tuple[Path, SqliteDb], page_size: int
) -> None:
    manifest, store = built
    path = tmp_path / "out" / "summary.json"
    summarize(path, store, manifest=str(manifest), page_size=page_size)
    assert path.read_bytes() == old_summary_text(store, "sum", str(manifest))
    # What the fixture holds, read back on its own terms (the oracle above could share a mistake).
    summary = json.loads(path.read_text())
    assert set(summary) == {"campaign", "counts", "done", "duplicates", "jobs", "manifest", "not_in_manifest"}
    assert summary["counts"] == {
        "done": 3,
        "failed": 1,
        "submitting": 2,
        "downloading": 1,
        "pending": 1,
        "unknown": 1,
        "running": 1,
        "invalid": 1,
    }
    assert summary["done"] is False and summary["duplicates"] == {"j02": ["r-j02-copy", "r-j02-third"]}
    # every job once, in the manifest's order; then the two sent and since removed, marked
    assert [j["id"] for j in summary["jobs"]] == [*ORDER, "j11", "j12"]
    assert summary["not_in_manifest"] == {"done": 1, "queued": 1}
    jobs = {j["id"]: j for j in summary["jobs"]}
    assert all(
        set(j)
        == {"id", "type", "state", "remote_id", "reason", "percentage", "duplicate_remote_ids"}
        | {"reconcile_after", "files"}
        | (set() if j["id"] in ORDER else {"in_manifest", "note"})
        for j in summary["jobs"]
    )
    assert jobs["j11"]["note"] == "not in the manifest any more" and jobs["j11"]["in_manifest"] is False
    assert jobs["j03"]["reconcile_after"] == WINDOW_END and jobs["j04"]["reconcile_after"] is None
    assert jobs["j01"]["reason"] == 'the service said: "no"\nline two — ü'
    assert [f["name"] for f in jobs["j00"]["files"]] == ["a.png", "b.png"]
    assert [(f["done"], f["lost"]) for f in jobs["j05"]["files"]] == [(True, False), (False, True)]
    assert jobs["j08"]["percentage"] == 42.5 and jobs["j08"]["state"] == "running"


def test_pages_hold_at_most_page_size_jobs_and_cover_every_job(built: tuple[Path, SqliteDb]) -> None:
    _, store = built
    pages = list(store.manifest_pages(4))
    assert [len(p) for p in pages] == [4, 4, 3]
    assert [row.id for page in pages for row, _ in page] == ORDER
    assert {row.id: [f.name for f in files] for page in pages for row, files in page if files} == {
        "j00": ["a.png", "b.png"],
        "j02": ["x.png"],
        "j05": ["p.png", "q.png"],
    }


def test_status_json_prints_the_old_text(built: tuple[Path, SqliteDb], capsys: pytest.CaptureFixture[str]) -> None:
    manifest, store = built
    capsys.readouterr()
    assert main(["status", str(manifest), "--json"]) == 0
    assert capsys.readouterr().out == old_status_text(store, "sum")
    paths = paths_for(load_manifest(manifest))
    assert anyio.run(collected, status_json("sum", paths, page_size=2)) == old_status_text(store, "sum")


def test_a_campaign_with_no_job_left_in_the_manifest(tmp_path: Path, built: tuple[Path, SqliteDb]) -> None:
    _, store = built
    store.sync_manifest("sum", [], [], NOW)
    path = tmp_path / "summary.json"
    summarize(path, store, manifest="m.yaml", page_size=2)
    assert path.read_bytes() == old_summary_text(store, "sum", "m.yaml")
    # none of the manifest's; those sent before they left it, marked (not j06 and j09: never paid for)
    assert {(j["id"], j.get("note")) for j in json.loads(path.read_text())["jobs"]} == {
        (j, "not in the manifest any more") for j in [*IN_MANIFEST, "j11", "j12"] if j not in ("j06", "j09")
    }


@pytest.mark.parametrize(
    ("left", "removed_ended", "unknown_settled", "done"),
    [
        (["j00", "j02", "j10"], True, True, False),
        (["j10", "j00"], False, True, False),
        (["j10", "j00"], True, False, False),
        (["j10", "j00"], True, True, True),
    ],
)
def test_done_means_every_job_done_and_none_paid_twice(
    tmp_path: Path,
    built: tuple[Path, SqliteDb],
    left: list[str],
    removed_ended: bool,
    unknown_settled: bool,
    done: bool,
) -> None:
    _, store = built
    sync(store, manifest_of(tmp_path / "again", left))  # only done jobs left; j02 is a duplicate
    # The jobs that left the manifest after they were sent are followed until they end, however
    # they end, and one left unknown (j07) until a person settles it: until then, not done.
    for row in store.jobs() if removed_ended else []:
        if not row.in_manifest and not row.state.terminal and row.state not in UNPAID:
            ending = JobState.LOST if row.state is JobState.DOWNLOADING else JobState.FAILED
            store.move(row.id, ending, NOW, reason="ended after it left the manifest")
    if unknown_settled:
        store.settle("j07", JobState.FAILED, NOW, remote_id=None, reason="settled by hand: given up")
    path = tmp_path / "summary.json"
    summarize(path, store, manifest="m.yaml", page_size=1)
    assert path.read_bytes() == old_summary_text(store, "sum", "m.yaml")
    assert json.loads(path.read_text())["done"] is done


def test_the_done_files_tally_counts_done_files_only(built: tuple[Path, SqliteDb]) -> None:
    _, store = built
    # j00's two, j02's one, j05's first (its second is lost), and j11's, which left the manifest.
    assert store.files_done_total() == (5, 200 + 3 + 100 + 100 + 7000)


def test_a_failure_halfway_through_leaves_the_previous_summary_whole(
    tmp_path: Path, built: tuple[Path, SqliteDb]
) -> None:
    manifest, store = built
    path = tmp_path / "summary.json"
    summarize(path, store, manifest=str(manifest))
    before = path.read_bytes()
    # The store refuses the page size only once the head of the record is written.
    with pytest.raises(ValueError, match="page_size"):
        summarize(path, store, manifest="other.yaml", page_size=0)
    assert path.read_bytes() == before
    assert not (tmp_path / f".summary.json.{os.getpid()}.tmp").exists()
    store.close()
    with pytest.raises(StoreError):  # a closed store: an error the CLI reports, not a traceback
        summarize(path, store, manifest="other.yaml")
    assert path.read_bytes() == before and not (tmp_path / f".summary.json.{os.getpid()}.tmp").exists()


@pytest.mark.anyio
async def test_a_real_run_writes_the_old_summary_and_tallies_its_files(tmp_path: Path) -> None:
    ids = [f"g{i:02d}" for i in range(14)]
    lines = ["campaign: real", "jobs:"]
    lines += [
        f"- {{id: {i}, type: image_gen, prompt: p {i}, base_model: stable-diffusion-v1-5, num_samples: 2}}" for i in ids
    ]
    path = write(tmp_path / "real.yaml", "\n".join(lines) + "\n")
    manifest = load_manifest(path)
    async with Simulator(fast_sim(faults=FaultPlan(rates=FaultRates(job_failure=0.3)), seed=8)) as sim:
        request = RunRequest(
            manifest=manifest,
            paths=paths_for(manifest),
            settings=fast_run(max_active=5),
            api_url=sim.url,
            api_key_file=write(tmp_path / "key", sim.api_key),
        )
        with anyio.fail_after(120):
            result = await run_campaign(request)
    counts = result.outcome.counts
    assert counts.get(JobState.FAILED) and counts.get(JobState.DONE), counts
    store = SqliteDb(result.paths.state)
    try:
        expected = old_summary_text(store, "real", str(manifest.path))
    finally:
        store.close()
    assert (result.paths.out / "summary.json").read_bytes() == expected
    on_disk = [p for p in result.paths.out.glob("g*/*.png")]
    assert result.files_done == len(on_disk) == 2 * counts[JobState.DONE]
    assert result.bytes_done == sum(p.stat().st_size for p in on_disk)
