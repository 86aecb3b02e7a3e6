"""Ctrl-C and SIGTERM through the real command line, with real signals: the first says at once
what happens next and lets the files in flight finish; a run that then finished everything
exits 0 with its normal summary; a second signal stops at once, state saved, exit 130."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .campaigns import assert_campaign_on_disk
from .conftest import FAST_CLI, ROOT, fast_sim, write

ONE_STREAM = ("--parallel-min-mb", "100")
MiB = 1024 * 1024
SIZE = 3 * MiB + 7  # the simulator sends a MiB, then waits what the rate asks: about 3 s at 1 MiB/s


def one_training(folder: Path) -> Path:
    return write(
        folder / "one.yaml",
        "campaign: one\njobs:\n  - {id: big, type: dreambooth, instance_prompt: p, image_urls: [u],"
        " base_model: stable-diffusion-v1-5, download: [checkpoint]}\n",
    )


class Cli:
    """`dreamlook-batch run` in a process of its own; its stderr read line by line as it comes."""

    def __init__(self, manifest: Path, sim: Any, *extra: str) -> None:
        args = [sys.executable, "-m", "orchestrator", "run", str(manifest), "--api-url", sim.url, *FAST_CLI, *extra]
        env = {**os.environ, "DREAMLOOK_API_KEY": sim.api_key}
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line.rstrip("\n"))

    def finish(self) -> tuple[int, str, list[str]]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()  # to its end: the process has exited (the summary is a few lines)
        self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode, out, self.err


def wait_for(seen: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll what a test can observe (the simulator's ledger, the log so far), with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not seen():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.01)


def test_a_first_sigterm_says_what_happens_next_and_a_run_that_then_finished_everything_exits_0(
    tmp_path: Path, threaded_sim: Any
) -> None:
    manifest = one_training(tmp_path)
    # The checkpoint comes at 1 MiB/s: seconds in flight when the signal arrives.
    with threaded_sim(fast_sim(checkpoint_bytes=SIZE, download_bytes_per_s=MiB)) as sim:
        cli = Cli(manifest, sim, *ONE_STREAM, "--log-format", "json", "-v")
        wait_for(lambda: sim.ledger.requests["download"] >= 1, "the download start")
        cli.proc.send_signal(signal.SIGTERM)
        code, out, err = cli.finish()
        lines = [json.loads(line) for line in err]
        names = [line["event"] for line in lines]
        assert code == 0, out + "\n".join(err)  # told to stop, yet nothing was left: not "interrupted"
        [stopping] = [line for line in lines if line["event"] == "run.stopping"]
        assert stopping["by"] == "SIGTERM" and stopping["grace_s"] == 20.0 and stopping["level"] == "warning"
        assert "finishing the files in flight (up to 20 s); press Ctrl-C again to stop now" in stopping["message"]
        assert names.index("run.stopping") < names.index("file.done")  # said at once, before the file ended
        [finished] = [line for line in lines if line["event"] == "run.finished"]
        assert finished["exit_code"] == 0 and finished["stopped_by"] == "none" and finished["counts"] == {"done": 1}
        assert "1 done" in out and "interrupted" not in out
        assert_campaign_on_disk(sim, tmp_path / "outputs" / "one", "one", ["big"])


def test_a_second_ctrl_c_stops_at_once_with_the_state_saved_and_exit_130(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = one_training(tmp_path)
    # At 0.3 MiB/s: 10 s, longer than the test waits for anything.
    with threaded_sim(fast_sim(checkpoint_bytes=SIZE, download_bytes_per_s=0.3 * MiB)) as sim:
        cli = Cli(manifest, sim, *ONE_STREAM, "-q")  # quiet: no warnings in the log, so the CLI says it
        wait_for(lambda: sim.ledger.requests["download"] >= 1, "the download start")
        cli.proc.send_signal(signal.SIGINT)
        said = "stopping: finishing the files in flight (up to 20 s); press Ctrl-C again to stop now"
        wait_for(lambda: any(said in line for line in cli.err), "the first signal's message")
        cli.proc.send_signal(signal.SIGINT)
        code, out, err = cli.finish()
        assert code == 130, out + "\n".join(err)
        assert "stopping now; the state is saved" in "\n".join(err)
        assert len(sim.ledger.jobs) == 1
    with sqlite3.connect(tmp_path / ".dreamlook-batch" / "one.db") as db:
        assert db.execute("SELECT state FROM jobs").fetchall() == [("downloading",)]  # the next run resumes it
    assert not (tmp_path / "outputs" / "one" / "big" / "SHA256SUMS").exists()
