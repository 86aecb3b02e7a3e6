"""Several workers on PostgreSQL: the same 10,000-job throughput run as the throughput
section, with the state in PostgreSQL beside SQLite; and scale-out of downloads, one
worker against three, with the simulator's per-connection bandwidth cap on (so the
network, not the CPU, is the limit, as on real links).

The database: `DREAMLOOK_TEST_POSTGRES` (default 127.0.0.1:5432, user postgres); each run
gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from .common import ROOT, our_run, sim_process, sim_requests
from .throughput import MAX_ACTIVE, OUR_TIME_SCALE, _campaign, _run

SERVER = os.environ.get("DREAMLOOK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
BANDWIDTH_MB = 8.0  # per download connection
CHECKPOINT_MB = 24
DOWNLOADS_PER_WORKER = 2  # files at once, one connection each


@contextlib.contextmanager
def database() -> Iterator[str]:
    name = f"dlb_bench_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield SERVER.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _throughput(jobs: int) -> dict[str, object]:
    """The throughput section's run, ours only, once per state store."""
    results: dict[str, object] = {"jobs": jobs}
    for name in ("sqlite", "postgres"):
        with (
            tempfile.TemporaryDirectory(prefix="dreamlook-bench-") as tmp,
            sim_process("--job-seconds", "0.05", "--small-files", "--seed", "3") as sim,
            database() if name == "postgres" else contextlib.nullcontext("") as url,
        ):
            manifest, _ = _campaign(jobs, Path(tmp))
            extra = ("--max-downloads", "32", *(("--state", url) if url else ()))
            cmd = our_run(manifest, sim.url, max_active=MAX_ACTIVE, time_scale=OUR_TIME_SCALE, extra=extra)
            run = _run(cmd, {**os.environ, "DREAMLOOK_API_KEY": sim.key})
            files = sum(1 for _ in (Path(tmp) / "outputs" / "tp").rglob("*.png"))
            results[name] = {**run, "jobs_per_s": jobs / run["wall_s"], "files": files}
    return results


def _trainings(folder: Path, count: int) -> Path:
    lines = ["campaign: wide", "jobs:"]
    for i in range(count):
        lines.append(
            f"- {{id: t{i:03d}, type: dreambooth, base_model: stable-diffusion-v1-5, instance_prompt: photo of p{i},"
            " steps: 800, image_urls: ['https://example.com/1.jpg'], extract_lora: disabled}"
        )
    path = folder / "wide.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _scale_out(trainings: int) -> dict[str, object]:
    """One worker, then three, each fetching `DOWNLOADS_PER_WORKER` files at once over one
    connection each, from a simulator that sends each connection at `BANDWIDTH_MB`."""
    results: dict[str, object] = {
        "trainings": trainings,
        "checkpoint_mb": CHECKPOINT_MB,
        "bandwidth_mb_per_connection": BANDWIDTH_MB,
        "downloads_per_worker": DOWNLOADS_PER_WORKER,
    }
    for workers in (1, 3):
        with (
            tempfile.TemporaryDirectory(prefix="dreamlook-bench-") as tmp,
            sim_process(
                "--job-seconds",
                "0.05",
                "--checkpoint-bytes",
                str(CHECKPOINT_MB * 10**6),
                "--bandwidth-mb",
                str(BANDWIDTH_MB),
                "--seed",
                "5",
            ) as sim,
            database() as url,
        ):
            manifest = _trainings(Path(tmp), trainings)
            extra = (
                "--state",
                url,
                "--max-downloads",
                str(DOWNLOADS_PER_WORKER),
                "--connections-per-file",
                "1",
                "--out",
                str(Path(tmp) / "out"),
            )
            cmd = our_run(manifest, sim.url, max_active=trainings, time_scale=OUR_TIME_SCALE, extra=extra)
            env = {**os.environ, "DREAMLOOK_API_KEY": sim.key}
            start = time.perf_counter()
            procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL) for _ in range(workers)]
            codes = [p.wait(1800) for p in procs]
            wall = time.perf_counter() - start
            if codes != [0] * workers:
                raise RuntimeError(f"{workers} workers exited {codes}")
            files = list((Path(tmp) / "out").rglob("*.safetensors"))
            requests = sim_requests(sim.url)
            results[f"{workers}"] = {
                "wall_s": wall,
                "files": len(files),
                "mb_per_s": sum(f.stat().st_size for f in files) / 1e6 / wall,
                "submits": requests.get("submit", 0),
            }
    one, three = results["1"], results["3"]
    assert isinstance(one, dict) and isinstance(three, dict)
    results["speedup"] = one["wall_s"] / three["wall_s"]
    return results


def measure(quick: bool) -> dict[str, object]:
    try:
        psycopg.connect(SERVER, connect_timeout=5).close()
    except psycopg.Error as exc:
        return {"error": f"no PostgreSQL at {SERVER}: {str(exc).strip().splitlines()[0]}"}
    return {
        "throughput": _throughput(1000 if quick else 10_000),
        "scale_out": _scale_out(8 if quick else 36),
    }


def lines(r: dict[str, object]) -> list[str]:
    if "error" in r:
        return [f"Not measured: {r['error']}."]
    t, s = r["throughput"], r["scale_out"]
    assert isinstance(t, dict) and isinstance(s, dict)
    sq, pg = t["sqlite"], t["postgres"]
    one, three = s["1"], s["3"]
    ratio = pg["wall_s"] / sq["wall_s"]
    return [
        f"{t['jobs']:,} near-instant image jobs end to end (the throughput section's run, ours), "
        "the state in SQLite and in PostgreSQL (same machine, one worker):",
        "",
        "| state | wall s | jobs/s | CPU s | peak RSS MB | files |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {row['wall_s']:.1f} | {row['jobs_per_s']:.0f} | {row['cpu_s']:.1f} | "
            f"{row['peak_rss_mb']:.0f} | {row['files']:,} |"
            for name, row in (("SQLite", sq), ("PostgreSQL", pg))
        ),
        "",
        f"PostgreSQL takes **{ratio:.2f}x** SQLite's wall time (goal: within 2x).",
        "",
        f"Scale-out: {s['trainings']} trainings whose {s['checkpoint_mb']} MB checkpoints are fetched from a "
        f"simulator that sends each connection at {s['bandwidth_mb_per_connection']:g} MB/s; every worker fetches "
        f"{s['downloads_per_worker']} files at once, one connection each, into one folder.",
        "",
        "| workers | wall s | MB/s together | files | POSTs |",
        "|---|---|---|---|---|",
        f"| 1 | {one['wall_s']:.1f} | {one['mb_per_s']:.1f} | {one['files']} | {one['submits']} |",
        f"| 3 | {three['wall_s']:.1f} | {three['mb_per_s']:.1f} | {three['files']} | {three['submits']} |",
        "",
        f"Three workers fetch the campaign **{s['speedup']:.2f}x** as fast as one (goal: at least 2.5x); "
        "each job was paid once (POSTs = trainings).",
    ]
