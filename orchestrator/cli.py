"""`dreamlook-batch`: parses arguments, calls `commands`, prints. No logic of its own.

Exit codes: `run/outcome.ExitCode`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
from rich.console import Console

from . import argtypes, commands, live, logs, ui
from .campaign import Campaign, CampaignResult
from .config import DEFAULT_API_URL, Limits, RunSettings, Timeouts
from .errors import (
    ApiError,
    CampaignLocked,
    DreamlookBatchError,
    ManifestError,
    TransportError,
    UsageError,
    first_error,
)
from .events import event
from .jobs_command import api_view, download_job
from .manifest.load import Manifest, load_manifest
from .models import JobType
from .report import write_report
from .run import preflight
from .run.outcome import ExitCode
from .state import given_state, is_database, joined_manifest

log = logging.getLogger(__name__)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        default=os.environ.get("DREAMLOOK_API_URL", DEFAULT_API_URL),
        help="API base URL (env DREAMLOOK_API_URL)",
    )
    parser.add_argument(
        "--api-key-file", type=Path, help="read the API key from this file instead of DREAMLOOK_API_KEY"
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines on stderr")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="fewer log lines")


def _campaign_opts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "manifest",
        type=Path,
        nargs="?",
        help="the campaign manifest (YAML, JSON or JSON Lines); leave it out to join with --campaign",
    )
    parser.add_argument(
        "--campaign",
        metavar="NAME",
        help="join a campaign that a `run MANIFEST` loaded into a postgresql:// --state (no manifest needed)",
    )
    # Kept as typed (not Path) until checked: Path would fold `s3://b` into a local `s3:/b`.
    parser.add_argument(
        "--state",
        help="state store: a SQLite file (default: <manifest dir>/.dreamlook-batch/<campaign>.db) or "
        "postgresql://user@host/db, shared by several hosts (default: $DREAMLOOK_BATCH_STATE)",
    )
    parser.add_argument(
        "--out",
        help="output folder (default: <manifest dir>/outputs/<campaign>/), or s3://bucket/prefix/ for a bucket",
    )
    parser.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        help="an S3-compatible store's endpoint for --out s3:// (R2, MinIO, B2, GCS); default: "
        "$AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamlook-batch", description="Run campaigns of dreamlook.ai jobs reliably.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a manifest offline; exit 0 or 2")
    _common(p)
    p.add_argument("manifest", type=Path)

    p = sub.add_parser("plan", help="what a run would do now; nothing is sent")
    _common(p)
    _campaign_opts(p)

    p = sub.add_parser("run", help="drive the campaign until every job is finished and every file on disk")
    _common(p)
    _campaign_opts(p)
    _run_options(p)

    p = sub.add_parser("status", help="the campaign as the state store has it; no API call")
    _common(p)
    _campaign_opts(p)
    p.add_argument("--json", action="store_true")
    _rehearsal_option(p)

    p = sub.add_parser("report", help="write OUT/report.html: the campaign to review, with its pictures")
    _common(p)
    _campaign_opts(p)
    _rehearsal_option(p)

    p = sub.add_parser("settle", help="decide an `unknown` job: it is REMOTE_ID, or --resubmit, or --give-up")
    _common(p)
    _campaign_opts(p)
    _settle_options(p)

    _jobs_command(sub)

    p = sub.add_parser("sim", help="serve the simulator of the API")
    _common(p)
    _sim_options(p)
    return parser


def _rehearsal_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--simulate",
        action="store_true",
        help="the rehearsal's state (`run --simulate`, `make demo`), not the real one",
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    """`run`: pacing, limits, downloads, callbacks, timeouts."""
    p.add_argument("--once", action="store_true", help="one pass, then exit (for cron)")
    p.add_argument("--simulate", action="store_true", help="start the simulator in-process and run against it")
    p.add_argument("--dry-run", action="store_true", help="send dry_run: true; nothing is charged, polled or saved")
    p.add_argument(
        "--max-active",
        type=argtypes.COUNT,
        default=Limits().max_active,
        help="jobs submitted and not finished (default %(default)s)",
    )
    p.add_argument(
        "--submit-rate",
        type=argtypes.POSITIVE,
        default=Limits().submit_rate_per_s,
        help="submissions per second (default %(default)s)",
    )
    p.add_argument(
        "--max-downloads",
        type=argtypes.COUNT,
        default=Limits().max_downloads,
        help="files downloading at once (default %(default)s)",
    )
    p.add_argument(
        "--max-new-jobs",
        type=argtypes.ALLOWANCE,
        help="submit at most this many jobs in this run, a spending guard (a shared state: in all runs that overlap)",
    )
    p.add_argument(
        "--requests-per-s",
        type=argtypes.POSITIVE,
        default=Limits().api_requests_per_s,
        help="API requests per second, all kinds (default %(default)s)",
    )
    p.add_argument(
        "--parallel-min-mb",
        type=argtypes.NON_NEGATIVE,
        default=RunSettings().parallel_min_bytes / 2**20,
        help="files this large (MiB) download over several connections (default %(default)g)",
    )
    p.add_argument(
        "--range-mb",
        type=argtypes.POSITIVE,
        default=RunSettings().range_bytes / 2**20,
        help="size of each range of a parallel download, MiB (default %(default)g)",
    )
    p.add_argument(
        "--connections-per-file",
        type=argtypes.COUNT,
        default=RunSettings().connections_per_file,
        help="connections for one large file (default %(default)s)",
    )
    p.add_argument(
        "--listen",
        type=argtypes.host_port,
        metavar="HOST:PORT",
        help="receive the API's callbacks here (each is only a hint, confirmed with a GET)",
    )
    p.add_argument(
        "--callback-url",
        metavar="URL",
        help="the public URL that reaches --listen (default: the listener's own address)",
    )
    p.add_argument(
        "--api-timeout",
        type=argtypes.POSITIVE,
        default=RunSettings().timeouts.api_read_s,
        help="seconds to wait for one API answer (default %(default)g)",
    )
    p.add_argument(
        "--lease-s",
        type=argtypes.POSITIVE,
        help="with a postgresql:// --state: how long this worker holds a job without renewing; a worker that "
        "stops renewing (killed, frozen, cut off) loses its jobs to the others this long after "
        "(default: 60 s, or twice a POST's whole timeout if longer: 2 x (10 s connect + --api-timeout + 5 s), "
        "150 s with the defaults)",
    )
    p.add_argument(
        "--reconcile-grace",
        type=argtypes.NON_NEGATIVE,
        metavar="S",
        help="after an answer is lost, wait this long more before looking for the job in the job list "
        "(the service may still be creating it; default: one more --api-timeout)",
    )
    p.add_argument(
        "--time-scale",
        type=argtypes.POSITIVE,
        default=1.0,
        help="divide every wait by this, to rehearse against `dreamlook-batch sim --time-scale` of the same value",
    )


def _settle_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--remote-id", help="the dreamlook.ai job id it turned out to be")
    group.add_argument("--resubmit", action="store_true", help="it does not exist: send it again")
    group.add_argument("--give-up", action="store_true", help="do not send it again; mark it failed")


def _jobs_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`jobs list TYPE`, `jobs get TYPE ID`: thin views of the API; `jobs download TYPE ID`: one job's files."""
    p = sub.add_parser(
        "jobs", help="the API's jobs: jobs list TYPE, jobs get TYPE ID, jobs download TYPE ID [--out DIR]"
    )
    _common(p)
    jobs = p.add_subparsers(dest="jobs_command", required=True, metavar="list|get|download")
    pl = jobs.add_parser("list")
    pl.add_argument("type")
    pl.add_argument("--limit", type=argtypes.COUNT)
    pl.add_argument("--json", action="store_true")
    pg = jobs.add_parser("get")
    pg.add_argument("type")
    pg.add_argument("id")
    pg.add_argument("--json", action="store_true")
    pd = jobs.add_parser("download", help="fetch one job's files, verified, with job.json and SHA256SUMS")
    pd.add_argument("type")
    pd.add_argument("id")
    pd.add_argument("--out", metavar="DIR", help="where the files go (default: the folder ID in the current one)")
    for q in (pl, pg, pd):
        _common(q)


def _sim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=argtypes.PORT, default=8750)
    p.add_argument(
        "--time-scale", type=argtypes.POSITIVE, default=1.0, help="how many times faster than the real service"
    )
    p.add_argument("--seed", type=argtypes.WHOLE, default=0)
    p.add_argument("--failure-rate", type=argtypes.SHARE, default=0.0, help="share of jobs that end in failure")
    p.add_argument("--tokens", type=argtypes.ALLOWANCE, help="token balance (default: unlimited)")
    p.add_argument("--capacity", type=argtypes.COUNT, help="jobs running at once; more wait queued")
    p.add_argument("--api-key", dest="sim_keys", action="append", help="a key the simulator accepts (repeatable)")
    p.add_argument("--small-files", action="store_true", help="checkpoints of a few MiB instead of GBs")
    p.add_argument(
        "--job-seconds",
        type=argtypes.NON_NEGATIVE,
        help="every job queues 0 s and runs this long (service seconds), whatever its size",
    )
    p.add_argument(
        "--checkpoint-bytes", type=argtypes.COUNT, help="size of a full SD 1.5 checkpoint (default: the docs' 2.1 GB)"
    )
    p.add_argument("--lora-bytes", type=argtypes.COUNT, help="size of an extracted LoRA (default: the docs' 75 MB)")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=RATE",
        help="a fault rate, e.g. server_error=0.05, rate_limited=0.1, ghost_submit=0.02, reset_download=0.1",
    )
    p.add_argument(
        "--requests-per-s", dest="sim_rps", type=argtypes.POSITIVE, help="per-key limit; over it: 429 with Retry-After"
    )
    p.add_argument(
        "--bandwidth-mb",
        type=argtypes.POSITIVE,
        help="each download connection sends at most this many MB/s (as a real link)",
    )


def _sim_settings(args: argparse.Namespace) -> Any:
    from .sim import FaultPlan, FaultRates, SimSettings

    rates: dict[str, float] = {}
    for item in args.fault:
        name, _, value = item.partition("=")
        if name not in FaultRates.__dataclass_fields__:
            raise UsageError(
                f"--fault {item!r}: unknown fault; choose from {', '.join(FaultRates.__dataclass_fields__)}"
            )
        try:
            rates[name] = argtypes.SHARE(value)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--fault {item!r}: {exc}") from exc
    base = SimSettings.for_demo() if args.small_files else SimSettings()
    keys = tuple(args.sim_keys) if args.sim_keys else base.api_keys
    sizes: dict[str, Any] = {
        k: v for k, v in (("checkpoint_bytes", args.checkpoint_bytes), ("lora_bytes", args.lora_bytes)) if v
    }
    if args.job_seconds is not None:
        sizes.update(
            queue_s=0.0,
            dreambooth_base_s=args.job_seconds,
            dreambooth_s_per_step=0.0,
            image_base_s=args.job_seconds,
            image_s_per_sample=0.0,
        )
    if args.bandwidth_mb is not None:
        sizes["download_bytes_per_s"] = args.bandwidth_mb * 1e6
    return replace(
        base,
        **sizes,
        api_keys=keys,
        seed=args.seed,
        time_scale=args.time_scale,
        tokens=args.tokens,
        capacity=args.capacity,
        faults=FaultPlan(
            rates=replace(FaultRates(), job_failure=args.failure_rate, **rates), requests_per_s=args.sim_rps
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_format, args.verbose - args.quiet)
    try:
        try:
            return _dispatch(args)
        except BaseExceptionGroup as group:  # from a task group: report the error inside
            raise first_error(group) from group
    except ManifestError as exc:
        _print_problems(exc.problems)
        return ExitCode.USAGE
    except CampaignLocked as exc:
        err.print(f"[bold red]locked:[/] {exc}")
        return ExitCode.LOCKED
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return ExitCode.USAGE
    except (ApiError, TransportError) as exc:
        err.print(f"[bold red]API error:[/] {logs.scrub(str(exc))}")
        return ExitCode.API
    except DreamlookBatchError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return ExitCode.FAILED
    except KeyboardInterrupt:
        err.print("interrupted; state saved")
        return ExitCode.INTERRUPTED


def _print_problems(problems: Sequence[Any]) -> None:
    errors = [p for p in problems if not p.warning]
    if logs.is_json():  # stderr is JSON lines only
        for problem in problems:
            name = "manifest.warning" if problem.warning else "manifest.error"
            event(log, name, file=problem.file, line=problem.line, job_id=problem.job_id, reason=problem.message)
        if errors:
            event(log, "manifest.rejected", errors=len(errors))
        return
    for problem in problems:
        colour = "yellow" if problem.warning else "red"
        err.print(f"[{colour}]{problem}[/]", markup=True)
    if errors:
        err.print(f"[bold red]{len(errors)} error(s)[/]: nothing was sent. Fix them and run again.")


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "sim":
        return _serve_sim(args)
    if command == "jobs":
        return _jobs(args)
    manifest = _manifest(args)
    if manifest.warnings:
        _print_problems(manifest.warnings)
    if command == "validate":
        by_type: dict[str, int] = {}
        for spec in manifest.jobs:
            by_type[spec.type.value] = by_type.get(spec.type.value, 0) + 1
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(by_type.items()))
        out.print(f"{manifest.path}: OK, campaign {manifest.campaign!r}, {len(manifest.jobs)} jobs ({kinds})")
        return ExitCode.OK
    paths = commands.paths_for(manifest, args.state, args.out, simulated=getattr(args, "simulate", False))
    if command == "plan":
        return _plan(manifest, paths, args.s3_endpoint_url)
    if command in ("status", "report"):
        _check_rehearsal(args, paths)
    if command == "status":
        return _status(manifest.campaign, paths, as_json=args.json)
    if command == "report":
        rows, files, _ = anyio.run(commands.status_rows, paths)
        if paths.bucket is not None:
            shown = anyio.run(commands.put_report, manifest.campaign, rows, files, paths.bucket, args.s3_endpoint_url)
        else:
            shown = str(anyio.run(write_report, manifest.campaign, rows, files, paths.out))
        out.print(f"report: {shown}")
        return ExitCode.OK
    if command == "settle":
        settle = partial(
            commands.settle, manifest, paths, args.job_id, remote_id=args.remote_id, resubmit=args.resubmit
        )
        message = anyio.run(settle)
        out.print(message)
        return ExitCode.OK
    return _run(args, manifest, paths)


def _manifest(args: argparse.Namespace) -> Manifest:
    """The manifest file, or (`--campaign NAME`, no file) the campaign as a database holds it."""
    campaign = getattr(args, "campaign", None)
    if args.manifest is not None:
        manifest = load_manifest(args.manifest)
        if campaign is not None and campaign != manifest.campaign:
            raise UsageError(f"--campaign {campaign!r}: {args.manifest} is campaign {manifest.campaign!r}")
        return manifest
    if campaign is None:
        raise UsageError("give the MANIFEST, or --campaign NAME to join a campaign kept in a postgresql:// --state")
    return anyio.run(joined_manifest, campaign, given_state(args.state))


def _run(args: argparse.Namespace, manifest: Any, paths: commands.Paths) -> int:
    needs = RunSettings(timeouts=Timeouts(api_read_s=args.api_timeout)).post_needs_s
    if args.lease_s is not None and args.lease_s <= needs:
        raise UsageError(
            f"--lease-s {args.lease_s:g}: a lease must outlast a POST's whole timeout plus a margin "
            f"({needs:g} s with --api-timeout {args.api_timeout:g}); give more than that"
        )
    limits = Limits(
        max_active=args.max_active,
        submit_rate_per_s=args.submit_rate,
        max_downloads=args.max_downloads,
        api_requests_per_s=args.requests_per_s,
        max_new_jobs=args.max_new_jobs,
    )
    simulate = None
    if args.simulate:
        from .sim import SimSettings

        if args.once:
            raise UsageError(
                "--simulate starts a simulator that ends with the run, so --once has nothing to come back to; "
                "serve one with `dreamlook-batch sim` and pass its URL with --api-url"
            )
        simulate = SimSettings.for_demo()
    campaign = Campaign(
        manifest,
        settings=RunSettings(
            limits=limits,
            dry_run=args.dry_run,
            timeouts=Timeouts(api_read_s=args.api_timeout),
            reconcile_grace_s=args.reconcile_grace,
            s3_endpoint_url=args.s3_endpoint_url,
            listen=args.listen or (_default_listen(args.callback_url) if args.callback_url else None),
            callback_url=args.callback_url,
            parallel_min_bytes=int(args.parallel_min_mb * 2**20),
            range_bytes=max(64 * 1024, int(args.range_mb * 2**20)),
            connections_per_file=args.connections_per_file,
            lease_s=args.lease_s,
        ).time_scaled(args.time_scale),
        state=args.state,
        out=args.out,
        api_url=args.api_url,
        api_key_file=args.api_key_file,
        simulate=simulate,
    )
    if simulate is not None and args.log_format == "text":  # a JSON log holds JSON lines only
        err.print(f"[dim]running against the built-in simulator ({simulate.time_scale:g}x faster than the service)[/]")
    watch = None
    if out.is_terminal and args.log_format == "text" and not args.quiet:
        # The live view shows the events; log lines would tear through it.
        logs.configure(args.log_format, args.verbose - args.quiet - 1)
        watch = partial(live.LiveView, console=out)
    # A first Ctrl-C or SIGTERM is said at once; the log says it too where it shows warnings.
    said = args.log_format == "text" and not logs.shows(logging.WARNING)
    control = commands.RunControl(on_stop=(lambda line: err.print(f"[yellow]{line}[/]")) if said else None)

    async def run() -> CampaignResult:
        async with campaign.open(once=args.once, buffer=0, watch=watch, control=control, signals=True) as running:
            pass
        return running.result

    started = time.monotonic()
    result = anyio.run(run)
    assert result.details is not None
    ui.print_summary(
        out,
        result.details,
        dry_run=args.dry_run,
        once=args.once,
        elapsed_s=time.monotonic() - started,
        campaign=_campaign_args(args),
    )
    return result.exit_code


def _default_listen(public_url: str) -> str:
    parts = urlsplit(public_url)
    try:
        port = parts.port  # ValueError: not a port from 0 to 65535
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise UsageError(f"--callback-url {public_url!r}: give an http(s) URL that reaches this machine")
    return f"0.0.0.0:{port or (443 if parts.scheme == 'https' else 80)}"


def _plan(manifest: Any, paths: commands.Paths, s3_endpoint_url: str | None) -> int:
    # What a run would refuse before its first POST, as far as can be told without creating anything
    # (a bucket: it answers and takes a test object, written and deleted).
    if paths.bucket is not None:
        anyio.run(commands.check_bucket, paths.bucket, s3_endpoint_url)
    else:
        preflight.check_output(paths.out, create=False)
    if paths.database is None:
        preflight.check_state(paths.state, create=False)
    plan = anyio.run(commands.make_plan, manifest, paths)
    out.print(f"campaign {manifest.campaign!r}: {len(manifest.jobs)} jobs; state {paths.at}")
    out.print(f"  submit now:           {len(plan.to_submit)}")
    out.print(f"  wait for a checkpoint: {len(plan.waiting_for_parent)}")
    out.print(f"  check (in flight):    {len(plan.to_check)}")
    out.print(f"  download:             {len(plan.to_download)} jobs, {plan.bytes_to_download / 1e6:.1f} MB known")
    for state, n in sorted(plan.finished.items()):
        out.print(f"  finished {state}: {n}")
    for job_id, until in plan.waiting_in_window:
        out.print(f"  submitting: {job_id}: waiting until {ui.clock(until)} before checking the job list")
    for job_id, others in plan.duplicates:
        out.print(f"  [red]duplicate:[/] {job_id}: the service also holds {', '.join(others)}")
    if plan.removed:
        shown = ", ".join(plan.removed[:10]) + (f" and {len(plan.removed) - 10} more" if len(plan.removed) > 10 else "")
        out.print(f"  not in the manifest any more, still followed and fetched (paid for): {shown}")
    for job_id in plan.changed_after_submit:
        out.print(f"  [yellow]changed after submission (will not be resubmitted):[/] {job_id}")
    out.print("nothing was sent")
    return ExitCode.OK


def _campaign_args(args: argparse.Namespace) -> str:
    """The arguments that name this campaign to the other commands, as the user gave them."""
    words = [str(args.manifest)] if args.manifest is not None else ["--campaign", args.campaign]
    if getattr(args, "simulate", False):
        words.append("--simulate")
    for option in ("state", "out"):
        if getattr(args, option, None):
            words += [f"--{option}", _shown_state(getattr(args, option))]
    return shlex.join(words)


def _shown_state(value: str) -> str:
    """A location as a message may show it: a database URL without its password."""
    if not is_database(value):
        return value
    from .store.pg_base import safe_url  # only with the extra installed

    return safe_url(value)


def _check_rehearsal(args: argparse.Namespace, paths: commands.Paths) -> None:
    """`status`/`report` without --simulate where only a rehearsal ran: say so, and how to see it."""
    default = f"{paths.campaign}.db"
    if args.simulate or paths.database is not None or paths.state.name != default or paths.state.exists():
        return
    rehearsal = paths.state.with_name(f"{paths.campaign}.simulated.db")
    if rehearsal.exists():
        raise UsageError(
            f"no state yet at {paths.state}: nothing has run against the API for campaign {paths.campaign!r}. "
            f"The rehearsal against the simulator (`run --simulate`, `make demo`) keeps its own state, "
            f"{rehearsal}; to see it: dreamlook-batch {args.command} {_campaign_args(args)} --simulate"
        )


def _status(campaign_name: str, paths: commands.Paths, *, as_json: bool) -> int:
    if as_json:
        anyio.run(_print_chunks, commands.status_json(campaign_name, paths))
        return ExitCode.OK
    rows, files, workers = anyio.run(commands.status_rows, paths)
    out.print(ui.status_table(rows, files, time.time(), width=out.width))
    out.print(f"files in {paths.out_shown}")
    if workers:
        out.print(ui.workers_table(workers, time.time()))
    return ExitCode.OK


async def _print_chunks(chunks: AsyncIterator[str]) -> None:
    async for chunk in chunks:
        sys.stdout.write(chunk)


def _jobs(args: argparse.Namespace) -> int:
    job_type = JobType.parse(args.type)
    if job_type is None:
        raise UsageError(f"unknown job type {args.type!r}; choose from {', '.join(JobType)}")
    job_id = getattr(args, "id", None)
    if args.jobs_command == "download":
        return _download(args, job_type, args.id)
    data = anyio.run(api_view, args.api_url, args.api_key_file, job_type, job_id, getattr(args, "limit", None))
    sys.stdout.write(commands.dump_json(logs.redact_json(data)) + "\n")
    return ExitCode.OK


def _download(args: argparse.Namespace, job_type: JobType, job_id: str) -> int:
    def say(line: str) -> None:
        out.print(line, markup=False)  # an error's text may hold brackets

    fetch = partial(download_job, args.api_url, args.api_key_file, job_type, job_id, args.out, say)
    got = anyio.run(fetch)
    out.print(f"{len(got.files)} file(s) of {job_type} job {job_id} in {got.folder}, with job.json and SHA256SUMS")
    if got.failed:
        err.print(
            f"[bold red]{len(got.failed)} file(s) not fetched:[/] {', '.join(got.failed)}; "
            "run the same command again to fetch them"
        )
        return ExitCode.FAILED
    return ExitCode.OK


def _serve_sim(args: argparse.Namespace) -> int:
    from .sim import serve

    settings = _sim_settings(args)

    def ready(sim: Any) -> None:
        out.print(f"dreamlook simulator at {sim.url}")
        out.print(f"  export DREAMLOOK_API_URL={sim.url}")
        out.print(f"  export DREAMLOOK_API_KEY={sim.api_key}   # a test key; the simulator accepts only its own keys")
        out.print(f"  time scale {settings.time_scale:g}x; Ctrl-C stops it")
        sys.stdout.flush()  # a script reading our first lines must not wait for a buffer

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the simulator is stopped
        anyio.run(serve, settings, args.host, args.port, ready)
    return ExitCode.OK
