"""Memory of a long campaign: peak RSS of `dreamlook-batch run` over 100,000 near-instant
jobs that download nothing, the simulator in its own process. What the engine keeps per
job in memory would show here as growth with the campaign; the goal is under 400 MB.

`python -m bench.memory [JOBS]` runs this section alone.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from .common import our_run, sim_process, sim_requests
from .throughput import _run

GOAL_MB = 400
MAX_ACTIVE = 500
TIME_SCALE = 100.0  # our own waits / 100, as in the throughput section


def _manifest(jobs: int, folder: Path) -> Path:
    """One template over a CSV of `jobs` rows: the bulk form a campaign this size would use."""
    with (folder / "rows.csv").open("w") as fh:
        fh.write("n\n")
        fh.writelines(f"{i:06d}\n" for i in range(jobs))
    manifest = folder / "mem.yaml"
    manifest.write_text(
        "campaign: mem\nbulk:\n  - rows: rows.csv\n    template: {id: 'm{n}', type: image_gen, prompt: 'p {n}', "
        "base_model: stable-diffusion-v1-5, num_samples: 1, width: 64, height: 64, download: none}\n"
    )
    return manifest


def measure(quick: bool, jobs: int | None = None) -> dict[str, object]:
    jobs = jobs or (10_000 if quick else 100_000)
    with (
        tempfile.TemporaryDirectory(prefix="dreamlook-bench-") as tmp,
        sim_process("--job-seconds", "0", "--small-files", "--seed", "5") as sim,
    ):
        manifest = _manifest(jobs, Path(tmp))
        cmd = our_run(manifest, sim.url, max_active=MAX_ACTIVE, time_scale=TIME_SCALE)
        run = _run(cmd, {**os.environ, "DREAMLOOK_API_KEY": sim.key}, timeout=3600)
        requests = sim_requests(sim.url)
        summary = json.loads((Path(tmp) / "outputs" / "mem" / "summary.json").read_text())
    return {
        "jobs": jobs,
        **run,
        "submits": requests.get("submit", 0),
        "done": summary["counts"].get("done", 0),
        "goal_mb": GOAL_MB,
    }


if __name__ == "__main__":
    print(json.dumps(measure(False, int(sys.argv[1]) if len(sys.argv) > 1 else None)))
