"""`python -m bench [--quick]`: run every measurement and rewrite bench/RESULTS.md.

Each section measures us and, where there is one, the obvious alternative in the
same run, so figures are read as ratios on a noisy machine. Tests never assert timings.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from . import downloads, simceiling
from .common import machine

Section = tuple[str, Callable[[bool], dict[str, object]], Callable[[dict[str, object]], list[str]]]


def _sim_lines(r: dict[str, object]) -> list[str]:
    gets, share = float(r["gets_per_s"]), float(r["sim_cpu_share"])  # type: ignore[arg-type]
    lines = [
        "| figure | value | goal |",
        "|---|---|---|",
        f"| job GETs per second, one simulator process, 64 connections | {gets:,.0f} | >= 2,000 |",
        f"| simulator CPU share during that (1.0 = its core is the limit) | {share:.2f} | |",
        f"| errors during the GET run | {r['errors']} | 0 |",
    ]
    if "stream_gb_per_s" in r:
        stream = float(r["stream_gb_per_s"])  # type: ignore[arg-type]
        runs = r["stream_runs_gb_per_s"]
        lines.append(
            f"| 1 GiB checkpoint to `curl -o /dev/null`, best run (runs: {runs}) | {stream:.2f} GB/s | > 1 GB/s |"
        )
    lines.append("")
    limit = "saturated" if share > 0.9 else "not saturated (the load generator was the limit)"
    lines.append(
        f"The simulator answers {gets:,.0f} job GETs/s with its core {limit}, {gets / 2000:.1f}x the goal: "
        "no campaign figure below comes near it."
    )
    return lines


def _download_lines(r: dict[str, object]) -> list[str]:
    if "error" in r:
        return [f"Not measured: {r['error']}."]
    size = float(r["size_gib"])  # type: ignore[arg-type]
    rows = {k: v for k, v in r.items() if isinstance(v, dict) and "cpu_s_per_gb" in v}
    curl = rows["curl"]["gb_per_s"]
    lines = [
        f"One {size:.2f} GiB checkpoint from the simulator to disk, best of the interleaved runs.",
        "",
        "| downloader | GB/s | ratio to `curl -o` | CPU s per GB |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['gb_per_s']:.2f} | {row['gb_per_s'] / curl:.2f} | {row['cpu_s_per_gb']:.2f} |")
    c = r["concurrent"]
    assert isinstance(c, dict)
    lines += [
        "",
        f"{c['files']} concurrent downloads of {c['gib_each']:.2f} GiB each in one process (4 ranges each): "
        f"{c['gb_per_s']:.2f} GB/s together, peak RSS **{c['peak_rss_mb']:.0f} MB** (goal: under 200 MB).",
        "",
        "Ours includes what curl does not do: sha256 of every byte while streaming, fsync, rename and a folder "
        "fsync; `curl+fsync` pays the same durability, `curl+sha256sum` is what a user who verifies would run. "
        "The simulator sends from the other of the 2 cores, so CPU spent here slows both. On loopback one "
        "connection already "
        "saturates the disk, so 4 ranges cost more (each range is synced and read back for the ordered hash) "
        "and gain nothing here; they are for real links where one TCP stream is the limit.",
    ]
    return lines


SECTIONS: list[Section] = [
    ("The simulator's own ceiling", simceiling.measure, _sim_lines),
    ("Downloads: ours against curl", downloads.measure, _download_lines),
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions (under 2 minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    body: list[str] = []
    for title, measure, render in SECTIONS:
        print(f"bench: {title} ...", flush=True)
        t = time.perf_counter()
        result = measure(args.quick)
        body += [f"## {title}", "", *render(result), "", f"_({time.perf_counter() - t:.0f} s)_", ""]
    header = [
        "# Benchmark results",
        "",
        f"Written by `make {'bench-quick' if args.quick else 'bench'}` "
        f"(`python -m bench{' --quick' if args.quick else ''}`) on {started}, in {time.perf_counter() - t0:.0f} s.",
        f"Machine: {machine()}.",
        "Every figure comes from this one run; ratios compare runs made side by side in it.",
        "",
    ]
    args.out.write_text("\n".join(header + body))
    print(f"bench: wrote {args.out}")


if __name__ == "__main__":
    main()
