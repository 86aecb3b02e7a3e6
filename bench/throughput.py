"""Throughput and overhead: 10,000 near-zero jobs with two small files each, end to end,
by dreamlook-batch and by the naive script, at the same limit of active jobs; and the
scale of the manifest: `validate` and `plan` of a 100,000-job bulk manifest.

Each client runs in its own process (its CPU and peak RSS are its own, from wait4), the
simulator in another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, our_run, sim_process, sim_requests

MAX_ACTIVE = 100
NAIVE_POLL_S = 0.05  # what suits jobs that take ~50 ms
OUR_TIME_SCALE = 100.0  # our own waits / 100: images then poll from 30 ms, like the naive 50 ms


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0,):
        said = proc.stderr.read()[-2000:].decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"{cmd[:4]!r} exited {proc.returncode}: {said}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def _campaign(jobs: int, folder: Path) -> tuple[Path, Path]:
    yaml_lines = ["campaign: tp", "jobs:"]
    jsonl = []
    for i in range(jobs):
        job = {
            "id": f"j{i:05d}",
            "type": "image_gen",
            "prompt": f"p{i}",
            "base_model": "stable-diffusion-v1-5",
            "num_samples": 2,
            "width": 64,
            "height": 64,
        }
        yaml_lines.append("- " + json.dumps(job))
        jsonl.append(json.dumps(job))
    (folder / "tp.yaml").write_text("\n".join(yaml_lines) + "\n")
    (folder / "tp.jsonl").write_text("\n".join(jsonl) + "\n")
    return folder / "tp.yaml", folder / "tp.jsonl"


def _end_to_end(jobs: int) -> dict[str, object]:
    results: dict[str, object] = {"jobs": jobs, "max_active": MAX_ACTIVE}
    for name in ("ours", "naive"):
        with (
            tempfile.TemporaryDirectory(prefix="dreamlook-bench-") as tmp,
            sim_process("--job-seconds", "0.05", "--small-files", "--seed", "3") as sim,
        ):
            folder = Path(tmp)
            manifest, jsonl = _campaign(jobs, folder)
            env = {**os.environ, "DREAMLOOK_API_KEY": sim.key}
            if name == "ours":
                cmd = our_run(
                    manifest, sim.url, max_active=MAX_ACTIVE, time_scale=OUR_TIME_SCALE, extra=("--max-downloads", "32")
                )
            else:
                cmd = [
                    sys.executable,
                    str(ROOT / "bench" / "naive.py"),
                    str(jsonl),
                    str(folder / "naive-out"),
                    "--api-url",
                    sim.url,
                    "--max-active",
                    str(MAX_ACTIVE),
                    "--poll-s",
                    str(NAIVE_POLL_S),
                ]
            sim_cpu0 = sim.cpu_s()
            run = _run(cmd, env)
            requests = sim_requests(sim.url)
            api = requests.get("submit", 0) + requests.get("get", 0) + requests.get("list", 0)
            files = sum(1 for _ in (folder / ("outputs/tp" if name == "ours" else "naive-out")).rglob("*.png"))
            results[name] = {
                **run,
                "jobs_per_s": jobs / run["wall_s"],
                "cpu_ms_per_job": 1000 * run["cpu_s"] / jobs,
                "api_requests_per_job": api / jobs,
                "requests": requests,
                "files": files,
                "sim_cpu_share": (sim.cpu_s() - sim_cpu0) / run["wall_s"],
            }
    return results


def _manifest_scale(rows: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="dreamlook-bench-") as tmp:
        folder = Path(tmp)
        with (folder / "subjects.csv").open("w") as fh:
            fh.write("name,token,steps,image_urls\n")
            for i in range(rows):
                fh.write(
                    f"s{i:06d},tok{i % 97},{800 + i % 5 * 100},https://example.com/{i}/1.jpg https://example.com/{i}/2.jpg\n"
                )
        (folder / "bulk.yaml").write_text(
            "campaign: big\ndefaults:\n  dreambooth: {base_model: realistic-vision-v5-1, learning_rate: 1.0e-6}\n"
            "bulk:\n  - rows: subjects.csv\n    template: {id: '{name}', type: dreambooth, instance_prompt: 'photo of "
            "{token} person', image_urls: '{image_urls}', steps: '{steps}'}\n"
        )
        out: dict[str, object] = {"jobs": rows}
        for command in ("validate", "plan"):
            out[command] = _run([sys.executable, "-m", "orchestrator", command, str(folder / "bulk.yaml")])
        return out


def measure(quick: bool) -> dict[str, object]:
    return {
        "end_to_end": _end_to_end(1000 if quick else 10_000),
        "manifest": _manifest_scale(10_000 if quick else 100_000),
    }
