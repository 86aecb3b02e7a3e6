"""`python -m bench [--quick]`: run every measurement and rewrite bench/RESULTS.md.

Each section measures us and, where there is one, the obvious alternative in the
same run, so figures are read as ratios on a noisy machine. Tests never assert timings.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from . import bucket, downloads, memory, simceiling, throughput, waiting, workers
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
    rate = {name: float(row["gb_per_s"]) for name, row in rows.items()}
    curl = rate["curl"]
    lines = [
        f"One {size:.2f} GiB file served by {r['server']} on loopback, to disk; best of the interleaved runs "
        "(each run's seconds in brackets).",
        "",
        "| downloader | GB/s | ratio to `curl -o` | CPU s per GB | runs (s) |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        runs = ", ".join(f"{t:.2f}" for t in row["runs_s"])
        lines.append(
            f"| {name} | {row['gb_per_s']:.2f} | {row['gb_per_s'] / curl:.2f} | {row['cpu_s_per_gb']:.2f} | {runs} |"
        )
    c = r["concurrent"]
    assert isinstance(c, dict)
    goals = [
        ("one stream against `curl -o` + fsync", rate["ours-1-stream"] / rate["curl+fsync"], 0.9),
        ("4 ranges against `curl -o` + fsync", rate["ours-4-ranges"] / rate["curl+fsync"], 1.0),
        ("one stream against `curl` then `sha256sum`", rate["ours-1-stream"] / rate["curl+sha256sum"], 2.5),
        (f"peak RSS of {c['files']} downloads of {c['gib_each']:.2f} GiB at once, MB", c["peak_rss_mb"], 200.0),
    ]
    lines += ["", "| goal | measured | goal | met |", "|---|---|---|---|"]
    for name, got, goal in goals:
        met = got < goal if name.startswith("peak RSS") else got >= goal
        shown = f"{got:.0f}" if name.startswith("peak RSS") else f"{got:.2f}x"
        bound = f"< {goal:.0f}" if name.startswith("peak RSS") else f">= {goal:g}x"
        lines.append(f"| {name} | {shown} | {bound} | {'yes' if met else '**no**'} |")
    lines += [
        "",
        f"{c['files']} concurrent downloads of {c['gib_each']:.2f} GiB each in one process (4 ranges each): "
        f"{c['gb_per_s']:.2f} GB/s together, peak RSS **{c['peak_rss_mb']:.0f} MB**.",
        "",
        "Ours does what curl does not: sha256 and crc32c of every byte (storage's crc32c is in `x-goog-hash`, as "
        "GCS sends it for a composite object), checked before the file is renamed into place, and its `.part` "
        "synced and recorded every range so a kill loses at most one range. `curl+fsync` pays the same "
        "durability; `curl+sha256sum` is what a user who verifies runs. Ours receives on the event loop while a "
        "pool thread writes the previous block (aiofiles) and another hashes it; ranged downloads hash the range "
        "at the hash's position as it arrives and read back from the page cache only what arrived ahead of it "
        "beyond a 4 MiB buffer. On loopback one connection already reaches the disk's pace: ranges are for real "
        "links, where one TCP stream is the limit.",
        "",
        "Where one stream's time goes: it syncs its `.part` and records the prefix as proven every `--range-mb` "
        f"(16 MiB), so a kill loses at most that much. The row `{downloads.PROOFS_256}` is the same download "
        "with a sync every 256 MiB: the difference is what 128 syncs of a growing file cost here (each waits for "
        "the pages written meanwhile too, and ext4 commits the file's new size and blocks). A larger "
        "`--range-mb` buys speed on a fast local disk with more bytes fetched again after a kill; on a real link "
        "(tens of MB/s) a sync every 16 MiB is a few per second and costs little. Ranges pay the same: each "
        "16 MiB range is synced before it is recorded, and a sync of the file waits for the other ranges' "
        "pages too.",
    ]
    return lines


def _waiting_lines(r: dict[str, object]) -> list[str]:
    ways = ("ours", "ours+callbacks", "fixed 20 s / 5 s")
    base = r[ways[2]]
    assert isinstance(base, dict)
    scale = float(r["time_scale"])  # type: ignore[arg-type]
    lines = [
        f"{r['jobs']} jobs (half training 10 to 30 min, half image generation 30 s to 3 min), at {scale:g}x.",
        "Lag: from the simulator's end of a job to the state store recording that we noticed, in service seconds",
        "(real milliseconds in brackets: the time scale multiplies every real delay, the client's own included).",
        "",
        "| way | API requests per job | ratio to baseline | median lag | p95 lag |",
        "|---|---|---|---|---|",
    ]
    for way in ways:
        w = r[way]
        assert isinstance(w, dict)
        med, p95 = float(w["lag_median_s"]), float(w["lag_p95_s"])
        lines.append(
            f"| {way} | {w['requests_per_job']:.2f} | {w['requests_per_job'] / base['requests_per_job']:.2f} | "
            f"{med:.1f} s ({1000 * med / scale:.0f} ms) | {p95:.1f} s ({1000 * p95 / scale:.0f} ms) |"
        )
    ours = r["ours"]
    assert isinstance(ours, dict)
    lines += [
        "",
        f"Ours uses {ours['requests_per_job'] / base['requests_per_job']:.0%} of the baseline's requests (goal: 25% or "
        f"fewer) at a median lag of {ours['lag_median_s']:.1f} s against {base['lag_median_s']:.1f} s: the schedule "
        "aims at each job's predicted end and the job list answers for many jobs at once. With callbacks the lag "
        "is what the client takes to confirm with a GET.",
    ]
    return lines


def _memory_lines(r: dict[str, object]) -> list[str]:
    jobs, rss, goal = int(r["jobs"]), float(r["peak_rss_mb"]), int(r["goal_mb"])  # type: ignore[call-overload,arg-type]
    wall, cpu = float(r["wall_s"]), float(r["cpu_s"])  # type: ignore[arg-type]
    return [
        f"`dreamlook-batch run` of {jobs:,} image jobs that end at once and download nothing (`download: none`; "
        f"each still gets its `job.json` and `SHA256SUMS`), at most {memory.MAX_ACTIVE} active, the simulator "
        "in its own process.",
        "",
        "| jobs | done | submissions | wall | CPU ms per job | peak RSS | goal |",
        "|---|---|---|---|---|---|---|",
        f"| {jobs:,} | {r['done']:,} | {r['submits']:,} | {wall:.0f} s | {1000 * cpu / jobs:.1f} | "
        f"**{rss:.0f} MB** | < {goal} MB |",
        "",
        "Job objects are dropped as their jobs end and a problem is listed once per job, so what the run "
        "holds per job is its manifest entry; `validate` of a manifest this size is in the section above. "
        "`summary.json` is written from the state store a page of jobs at a time, so the end of the run "
        "adds nothing that grows with the campaign.",
    ]


SECTIONS: list[Section] = [
    ("The simulator's own ceiling", simceiling.measure, _sim_lines),
    ("Downloads: ours against curl", downloads.measure, _download_lines),
    ("Waiting: requests and lag against fixed-interval polling", waiting.measure, _waiting_lines),
    ("Throughput and scale against the naive script", throughput.measure, throughput.lines),
    ("Memory of a 100,000-job campaign", memory.measure, _memory_lines),
    ("Several workers on PostgreSQL", workers.measure, workers.lines),
    ("Into a bucket: streamed against download-then-upload", bucket.measure, bucket.lines),
]


def section(title: str, lines: list[str], seconds: float, note: str = "") -> list[str]:
    return [f"## {title}", "", *lines, "", f"_({seconds:.0f} s{note})_", ""]


def replace_section(text: str, title: str, lines: list[str]) -> str:
    """`text` (a RESULTS.md) with its section `## title` replaced by `lines` (appended if absent)."""
    rows = text.split("\n")
    start = next((i for i, row in enumerate(rows) if row == f"## {title}"), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + "\n".join(lines)
    end = next((i for i in range(start + 1, len(rows)) if rows[i].startswith("## ")), len(rows))
    return "\n".join(rows[:start] + lines + rows[end:])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions (under 2 minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument(
        "--only",
        metavar="WORD",
        help="measure only the sections whose title holds WORD (e.g. memory) and replace just those in --out",
    )
    args = parser.parse_args()
    chosen = [s for s in SECTIONS if args.only is None or args.only.lower() in s[0].lower()]
    if not chosen:
        parser.error(f"no section title holds {args.only!r}: {', '.join(t for t, _, _ in SECTIONS)}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = f"python -m bench{' --quick' if args.quick else ''}"
    t0 = time.perf_counter()
    sections: list[tuple[str, list[str]]] = []
    for title, measure, render in chosen:
        print(f"bench: {title} ...", flush=True)
        t = time.perf_counter()
        result = measure(args.quick)
        # A section measured alone says so: it is not from the run the header names.
        note = f"; measured alone by `{command} --only {args.only}` on {started}" if args.only else ""
        sections.append((title, section(title, render(result), time.perf_counter() - t, note)))
    if args.only and args.out.exists():
        text = args.out.read_text()
        for title, lines in sections:
            text = replace_section(text, title, lines)
        args.out.write_text(text)
        print(f"bench: updated {', '.join(t for t, _ in sections)} in {args.out}")
        return
    header = [
        "# Benchmark results",
        "",
        f"Written by `make {'bench-quick' if args.quick else 'bench'}` "
        f"(`{command}`) on {started}, in {time.perf_counter() - t0:.0f} s.",
        f"Machine: {machine()}.",
        "Every figure comes from this one run; ratios compare runs made side by side in it.",
        "",
    ]
    args.out.write_text("\n".join(header + [line for _, lines in sections for line in lines]))
    print(f"bench: wrote {args.out}")


if __name__ == "__main__":
    main()
