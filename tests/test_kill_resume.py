"""SIGKILL in the middle of a large parallel download; the restart fetches no finished
range again and the file ends with the right sha256."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from .campaigns import assert_campaign_on_disk
from .conftest import cli_process, fast_sim, write

MiB = 1024 * 1024


def cli(manifest: Path, sim: Any, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    parallel = ["--parallel-min-mb", "1", "--range-mb", "1", "--connections-per-file", "4"]
    return cli_process(manifest, sim, *parallel, *extra, env=env)


def ranges_done(state: Path) -> set[int]:
    if not state.exists():
        return set()
    with sqlite3.connect(state, timeout=5) as db:
        try:
            return {row[0] for row in db.execute("SELECT idx FROM file_ranges")}
        except sqlite3.OperationalError:
            return set()


def test_sigkill_mid_parallel_download_then_resume(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = write(
        tmp_path / "big.yaml",
        "campaign: big\njobs:\n  - {id: big, type: dreambooth, instance_prompt: p, image_urls: [u],"
        " base_model: stable-diffusion-v1-5, extract_lora: disabled}\n",
    )
    state = tmp_path / ".dreamlook-batch" / "big.db"
    size = 24 * MiB + 7
    # 4 connections at 3 MiB/s each: ~2 s for the file, time to kill it in the middle.
    settings = fast_sim(checkpoint_bytes=size, retention_s=1e9, download_bytes_per_s=3 * MiB)
    with threaded_sim(settings) as sim:
        first = cli(manifest, sim)
        deadline = time.monotonic() + 30
        while len(ranges_done(state)) < 6:
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the download never got going"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        done_at_kill = ranges_done(state)
        served_before = len(sim.ledger.downloads)
        assert 6 <= len(done_at_kill) < 25, done_at_kill
        assert (tmp_path / "outputs" / "big" / "big").is_dir()
        assert not list((tmp_path / "outputs" / "big" / "big").glob("*.safetensors")), "no final file yet"

        second = cli(manifest, sim)
        output = second.communicate(timeout=60)[0]
        assert second.returncode == 0, output
        again = [d for d in sim.ledger.downloads[served_before:] if d.start // MiB in done_at_kill]
        assert again == [], f"finished ranges fetched again: {again}"
        resumed = {d.start // MiB for d in sim.ledger.downloads[served_before:]}
        assert resumed == set(range(25)) - done_at_kill
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "big", "big", ["big"])
    assert ranges_done(state) == set()  # forgotten once the file is placed


def test_killed_between_verifying_and_renaming_a_file(tmp_path: Path, threaded_sim: Any) -> None:
    """A whole .part with no final name yet: images (size unknown) and checkpoints alike."""
    manifest = write(
        tmp_path / "mix.yaml",
        "campaign: mix\njobs:\n"
        "  - {id: img, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5, num_samples: 2}\n"
        "  - {id: ckp, type: dreambooth, instance_prompt: p, image_urls: [u], base_model: stable-diffusion-v1-5}\n",
    )
    with threaded_sim(fast_sim()) as sim:
        crashed = cli(manifest, sim, "--max-downloads", "1", env={"DREAMLOOK_BATCH_CRASH_AT": "before-rename"})
        crashed.communicate(timeout=60)
        assert crashed.returncode == -signal.SIGKILL
        parts = list((tmp_path / "outputs" / "mix").rglob("*.part"))
        assert len(parts) == 1 and parts[0].stat().st_size > 0
        served = len(sim.ledger.downloads)
        rerun = cli(manifest, sim, "--max-downloads", "1")
        output = rerun.communicate(timeout=60)[0]
        assert rerun.returncode == 0, output
        # The whole part was placed after a 416 said so: its bytes were not fetched again.
        name = parts[0].name.removesuffix(".part")
        assert [d.status for d in sim.ledger.downloads[served:] if d.path.endswith(name)] == [416]
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "mix", "mix", ["img", "ckp"])
