"""Helpers for benchmarks: a simulator in its own process, timing, CPU and memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SimProcess:
    url: str
    key: str
    proc: subprocess.Popen[str]

    def cpu_s(self) -> float:
        """User+system CPU seconds of the simulator process so far (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks


@contextmanager
def sim_process(*args: str) -> Iterator[SimProcess]:
    """`dreamlook-batch sim` on a free port, in its own process (its own core)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sim", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" at ")[1].strip()
        proc.stdout.readline()
        key = proc.stdout.readline().split("DREAMLOOK_API_KEY=")[1].split()[0]
        yield SimProcess(url, key, proc)
    finally:
        proc.terminate()
        proc.wait(10)


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def peak_rss_mb_children() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.cpu0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu0


def run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a helper that prints one JSON object on its last line; /usr/bin/time-like RSS included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    data = json.loads(out.strip().splitlines()[-1])
    data.setdefault("cpu_s", (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return dict(data)


def sim_requests(url: str) -> dict[str, int]:
    """The simulator's request counts by route, from its ledger."""
    import urllib.request

    req = urllib.request.Request(f"{url}/_sim/ledger", headers={"x-sim-admin": "sim-admin"})
    with urllib.request.urlopen(req) as resp:
        return dict(json.load(resp)["requests"])


def our_run(manifest: Path, url: str, *, max_active: int, time_scale: float, extra: tuple[str, ...] = ()) -> list[str]:
    """`dreamlook-batch run` as the benchmarks drive it: limits out of the way, quiet."""
    return [
        sys.executable, "-m", "orchestrator", "run", str(manifest), "--api-url", url,
        "--max-active", str(max_active), "--submit-rate", "100000", "--requests-per-s", "100000",
        *extra, "--time-scale", str(time_scale), "-q",
    ]  # fmt: skip
