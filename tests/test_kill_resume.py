"""SIGKILL in the middle of a download, at a crash point (never at a moment chosen by a
clock), then a resume with other download settings: the resume reuses exactly the bytes
the first run proved and fetches no proven byte again; the file ends with the bytes the
simulator made."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault

from .campaigns import assert_campaign_on_disk
from .conftest import cli_process, fast_sim, write

MiB = 1024 * 1024
SIZE = 6 * MiB + 7  # above the 1 MiB from which a part is recorded, and not a whole number of ranges
CRASH = "DREAMLOOK_BATCH_CRASH_AT"

# Killed runs use one connection: at the crash point no other request is in flight, so every
# request the simulator logs after the kill comes from the resumed run.
RANGES_1MB = ("--parallel-min-mb", "1", "--range-mb", "1", "--connections-per-file", "1")
ONE_STREAM_1MB = ("--parallel-min-mb", "100", "--range-mb", "1")  # above the file: one stream


def cli(manifest: Path, sim: Any, *settings: str, crash: str | None = None) -> subprocess.Popen[str]:
    return cli_process(manifest, sim, *settings, env={CRASH: crash} if crash else None)


def proven_spans(state: Path) -> list[tuple[int, int]]:
    """(start, end) of every span the store holds as proven."""
    with sqlite3.connect(state, timeout=5) as db:
        return sorted((s, s + n) for s, n in db.execute("SELECT start, length FROM part_spans"))


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def big_manifest(folder: Path) -> Path:
    return write(
        folder / "big.yaml",
        "campaign: big\njobs:\n  - {id: big, type: dreambooth, instance_prompt: p, image_urls: [u],"
        " base_model: stable-diffusion-v1-5, extract_lora: disabled}\n",
    )


@pytest.mark.parametrize(
    ("first", "kill_after", "then"),
    [
        pytest.param(
            RANGES_1MB,
            3,
            ("--parallel-min-mb", "1", "--range-mb", "1.5", "--connections-per-file", "4"),
            id="ranges-then-other-range-size",
        ),
        pytest.param(RANGES_1MB, 3, ONE_STREAM_1MB, id="ranges-then-one-stream"),
        pytest.param(
            RANGES_1MB,
            4,
            ("--parallel-min-mb", "1", "--range-mb", "2", "--connections-per-file", "3"),
            id="ranges-then-more-connections",
        ),
        pytest.param(
            ONE_STREAM_1MB,
            2,
            ("--parallel-min-mb", "1", "--range-mb", "2", "--connections-per-file", "4"),
            id="one-stream-then-ranges",
        ),
        pytest.param(ONE_STREAM_1MB, 2, ("--parallel-min-mb", "100", "--range-mb", "3"), id="one-stream-then-again"),
    ],
)
def test_sigkill_mid_download_then_resume_with_other_settings(
    tmp_path: Path, threaded_sim: Any, first: tuple[str, ...], kill_after: int, then: tuple[str, ...]
) -> None:
    manifest = big_manifest(tmp_path)
    state = tmp_path / ".dreamlook-batch" / "big.db"
    folder = tmp_path / "outputs" / "big" / "big"
    with threaded_sim(fast_sim(checkpoint_bytes=SIZE)) as sim:
        killed = cli(manifest, sim, *first, crash=f"span-proven:{kill_after}")
        output = killed.communicate(timeout=60)[0]
        assert killed.returncode == -signal.SIGKILL, output
        proven = proven_spans(state)
        total = sum(end - start for start, end in proven)
        if first == ONE_STREAM_1MB:  # a prefix, proven each time a range's worth more was written
            assert len(proven) == 1 and proven[0][0] == 0 and kill_after * MiB <= total < SIZE, proven
        else:  # killed right after the n-th range was synced and recorded: exactly those are proven
            assert proven == [(i * MiB, (i + 1) * MiB) for i in range(kill_after)], proven
            # Several connections leave holes between proven ranges; make one, as they would: the
            # store forgets the second range (fewer proven bytes than on disk is always safe).
            with sqlite3.connect(state) as db:
                db.execute("DELETE FROM part_spans WHERE start=?", (MiB,))
            proven = proven_spans(state)
            total = sum(end - start for start, end in proven)
            assert proven[0] == (0, MiB) and proven[1][0] == 2 * MiB
        assert [p.name for p in folder.iterdir() if p.suffix == ".part"], "the part is kept"
        assert not list(folder.glob("*.safetensors")), "no final file yet"
        served_before = len(sim.ledger.downloads)

        resumed = cli(manifest, sim, *then)
        output = resumed.communicate(timeout=60)[0]
        assert resumed.returncode == 0, output
        served = [(d.start, d.end) for d in sim.ledger.downloads[served_before:]]
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "big", "big", ["big"])
    one_stream = "100" in then
    if one_stream:
        # One request, from the end of the proven prefix (0 when the first bytes were not proven).
        prefix = 0
        for start, end in proven:  # sorted; touching spans make one prefix
            if start <= prefix:
                prefix = max(prefix, end)
        assert served == [(prefix, SIZE)], served
    else:
        again = [s for s in served if any(overlaps(s, p) for p in proven)]
        assert again == [], f"proven bytes fetched again: {again}"
        assert sorted(served + proven)[0][0] == 0
        assert sum(e - s for s, e in served) + total == SIZE  # the gaps, exactly
    assert proven_spans(state) == []  # forgotten once the file is placed


def test_killed_between_verifying_and_renaming_a_large_file(tmp_path: Path, threaded_sim: Any) -> None:
    """Every byte proven, no final name yet: the rerun checks the part and places it, no request."""
    manifest = big_manifest(tmp_path)
    with threaded_sim(fast_sim(checkpoint_bytes=SIZE)) as sim:
        crashed = cli(manifest, sim, *ONE_STREAM_1MB, crash="before-rename")
        crashed.communicate(timeout=60)
        assert crashed.returncode == -signal.SIGKILL
        served = len(sim.ledger.downloads)
        rerun = cli(manifest, sim, *RANGES_1MB)
        output = rerun.communicate(timeout=60)[0]
        assert rerun.returncode == 0, output
        assert sim.ledger.downloads[served:] == []
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "big", "big", ["big"])


def test_killed_between_verifying_and_renaming_an_image(tmp_path: Path, threaded_sim: Any) -> None:
    """A whole .part of unknown size proves nothing: it is fetched again, never placed on a 416."""
    manifest = write(
        tmp_path / "mix.yaml",
        "campaign: mix\njobs:\n"
        "  - {id: img, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5, num_samples: 2}\n"
        "  - {id: ckp, type: dreambooth, instance_prompt: p, image_urls: [u], base_model: stable-diffusion-v1-5}\n",
    )
    with threaded_sim(fast_sim()) as sim:
        crashed = cli(manifest, sim, "--max-downloads", "1", crash="before-rename")
        crashed.communicate(timeout=60)
        assert crashed.returncode == -signal.SIGKILL
        parts = list((tmp_path / "outputs" / "mix").rglob("*.part"))
        assert len(parts) == 1 and parts[0].name.endswith(".png.part")  # images go first: 1 h URLs
        served = len(sim.ledger.downloads)
        rerun = cli(manifest, sim, "--max-downloads", "1")
        output = rerun.communicate(timeout=60)[0]
        assert rerun.returncode == 0, output
        name = parts[0].name.removesuffix(".part")
        assert [(d.start, d.status) for d in sim.ledger.downloads[served:] if d.path.endswith(name)] == [(0, 200)]
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "mix", "mix", ["img", "ckp"])


@pytest.mark.parametrize("then", [RANGES_1MB, ONE_STREAM_1MB], ids=["ranges", "one-stream"])
def test_an_object_rewritten_between_runs_starts_the_file_over(
    tmp_path: Path, threaded_sim: Any, then: tuple[str, ...]
) -> None:
    """The proven spans belong to the ETag recorded with them: storage gives no md5 here, so only
    the recorded ETag tells the old generation's bytes from the new one's."""
    manifest = big_manifest(tmp_path)
    with threaded_sim(fast_sim(checkpoint_bytes=SIZE, hash_max_bytes=0, crc32c=False)) as sim:
        killed = cli(manifest, sim, *RANGES_1MB, crash="span-proven:3")
        killed.communicate(timeout=60)
        assert killed.returncode == -signal.SIGKILL
        sim.set_faults(FaultPlan(script=(ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.REWRITE, nth=1),)))
        resumed = cli(manifest, sim, *then)
        output = resumed.communicate(timeout=60)[0]
        assert resumed.returncode == 0, output
        assert sim.service.generations
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "big", "big", ["big"])  # the new generation


def test_a_whole_part_with_nothing_proven_is_fetched_again_never_placed_on_a_416(
    tmp_path: Path, threaded_sim: Any
) -> None:
    """A full-length .part the store proves nothing of (a state file from version 1, say)."""
    manifest = big_manifest(tmp_path)
    state = tmp_path / ".dreamlook-batch" / "big.db"
    with threaded_sim(fast_sim(checkpoint_bytes=SIZE)) as sim:
        crashed = cli(manifest, sim, *ONE_STREAM_1MB, crash="before-rename")
        crashed.communicate(timeout=60)
        assert crashed.returncode == -signal.SIGKILL
        (part,) = (tmp_path / "outputs" / "big" / "big").glob("*.part")
        part.write_bytes(b"\0" * SIZE)  # the right length, the wrong bytes
        with sqlite3.connect(state) as db:
            db.execute("DELETE FROM part_spans")
        served = len(sim.ledger.downloads)
        rerun = cli(manifest, sim, *ONE_STREAM_1MB)
        output = rerun.communicate(timeout=60)[0]
        assert rerun.returncode == 0, output
        assert [(d.start, d.status) for d in sim.ledger.downloads[served:]] == [(0, 200)]
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "big", "big", ["big"])
