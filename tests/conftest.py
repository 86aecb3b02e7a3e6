"""Shared test helpers: fast simulator settings, a simulator on a background thread
(for CLI and subprocess tests), and a tiny HTTP helper. No mocks: everything runs
the real simulator over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.config import Limits, RunSettings
from orchestrator.sim import SimSettings, Simulator

from .postgres_server import pg_empty_url, pg_template, pg_url  # noqa: F401  (fixtures: a fresh PostgreSQL database)
from .s3_server import s3, s3_endpoint  # noqa: F401  (fixtures: a fresh bucket on a loopback S3 server)

# Training of 1200 steps: ~1000 service seconds / 20000 = 0.05 s.
FAST_SCALE = 20_000.0


def fast_sim(**overrides: Any) -> SimSettings:
    base = SimSettings(
        time_scale=FAST_SCALE,
        retention_s=1e9,  # far off: at 20000x 48 h is 8.6 s; tests of retention set their own
        checkpoint_bytes=256 * 1024 + 13,
        sdxl_checkpoint_bytes=512 * 1024 + 29,
        lora_bytes=64 * 1024 + 5,
        image_max_px=24,
    )
    return replace(base, **overrides)


def fast_run(scale: float = FAST_SCALE, *, settings: dict[str, Any] | None = None, **limits: Any) -> RunSettings:
    base = Limits(max_active=400, submit_rate_per_s=2000.0, api_requests_per_s=5000.0, max_downloads=16)
    return RunSettings(limits=replace(base, **limits), **(settings or {})).time_scaled(scale)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ThreadedSim:
    """A Simulator serving from its own thread and event loop, for code that calls anyio.run."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.sim: Simulator | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with Simulator(self.settings) as sim:
                self.sim = sim
                self._ready.set()
                await self._stop.wait()

        asyncio.run(serve())

    def __enter__(self) -> Simulator:
        self._thread.start()
        assert self._ready.wait(10), "simulator did not start"
        assert self.sim is not None
        return self.sim

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def threaded_sim() -> Iterator[Any]:
    """Call it with settings: `with threaded_sim(fast_sim()) as sim: ...`."""
    yield ThreadedSim


ROOT = Path(__file__).resolve().parent.parent
FAST_CLI = ["--time-scale", "20000", "--max-active", "50", "--submit-rate", "500", "--requests-per-s", "2000"]


def cli_process(
    manifest: Path, sim: Any, *extra: str, env: dict[str, str] | None = None, capture: bool = True
) -> subprocess.Popen[str]:
    """`dreamlook-batch run` against `sim` in a process of its own (to be killed, signalled, timed).

    With `capture`, read its output with communicate(); without, it goes to /dev/null (a pipe
    nobody reads could fill and stall the run)."""
    args = [sys.executable, "-m", "orchestrator", "run", str(manifest), "--api-url", sim.url, *FAST_CLI, *extra]
    full_env = {**os.environ, "DREAMLOOK_API_KEY": sim.api_key, **(env or {})}
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    stderr = subprocess.STDOUT if capture else subprocess.DEVNULL
    return subprocess.Popen(args, env=full_env, cwd=ROOT, stdout=output, stderr=stderr, text=True)


async def until(seen: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for something a test can observe (a ledger entry, a store row), with a deadline.
    The simulator and store offer no event to wait on, so this looks every few milliseconds."""
    with anyio.fail_after(timeout_s):
        while not seen():  # noqa: ASYNC110
            await anyio.sleep(0.005)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def tmpfs_at(folder: Path, size_mb: int, *, inodes: int | None = None) -> Iterator[Path]:
    """`folder` on a real tmpfs of its own of `size_mb` MiB, with at most `inodes` files if
    given (mounting needs root: the test is skipped elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mb}m" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def in_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 120) -> tuple[int, str]:
    """`python -m orchestrator ARGS` in a real pseudo-terminal (with `env` added, e.g. COLUMNS):
    its exit code and everything it drew, escape codes and all."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal's side
        os.chdir(cwd)
        os.environ.update(env)
        os.execv(sys.executable, [sys.executable, "-m", "orchestrator", *args])
    screen = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `make mutants`, a mutant's tests run fastest first: mutmut stops at the first
    failure (-x), so a killed mutant costs its quickest killing test, not a slow one that
    happened to come first. The durations are mutmut's own, from its stats run."""
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    try:
        durations: dict[str, float] = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return  # the stats run itself: no durations yet
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
