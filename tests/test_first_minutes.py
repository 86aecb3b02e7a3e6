"""A new user's first minutes, through the real CLI: `make demo` on a fresh clone, then the
commands it prints; the summary that names the campaign as typed; `status` that never cuts
a job id, on a narrow terminal or through a pipe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault

from .conftest import FAST_CLI, ROOT, cli_process, fast_sim, write

CLI = [sys.executable, "-m", "orchestrator"]
LONG_IDS = [f"subject-portrait-campaign-2026-alpha-{n:04d}" for n in (1, 2)]  # 41 characters, a common prefix


def sh(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A command as a user types it, its output through a pipe."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "DREAMLOOK_BATCH_STATE")}
    return subprocess.run(args, cwd=cwd, env={**full_env, **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh clone of this repository (what is committed, nothing a run left behind)."""
    if shutil.which("git") is None or shutil.which("make") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git, make and a git checkout")
    sh(["git", "clone", "--quiet", str(ROOT), str(tmp_path / "clone")], tmp_path).check_returncode()
    return tmp_path / "clone"


def test_make_demo_on_a_fresh_clone_then_the_commands_it_prints(clone: Path) -> None:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "dreamlook-batch").exists():
        pytest.skip("the tests do not run from the project's virtualenv")
    # The Makefile's own demo target, with the environment already installed (no second pip install).
    demo = sh(["make", "demo", f"VENV={venv}", "-o", f"{venv}/.installed"], clone)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "run finished in" in out and "3 done" in out
    page = clone / "jobs" / "outputs" / "example" / "report.html"
    assert page.exists() and f"report: {page}" in out  # the demo wrote its report
    bin_ = venv / "bin"
    for told in ("status jobs/example.yaml --simulate", "report jobs/example.yaml --simulate"):
        assert f"{bin_}/dreamlook-batch {told}" in out  # the commands to look at what it did
    assert "jobs/outputs/example/" in out and "example.simulated.db" in out  # where things are

    # The natural next command, without --simulate: the real state does not exist; the error says
    # where the rehearsal's is and gives the command.
    status = sh([str(bin_ / "dreamlook-batch"), "status", "jobs/example.yaml"], clone)
    assert status.returncode == 2
    assert "example.simulated.db" in status.stderr
    assert "dreamlook-batch status jobs/example.yaml --simulate" in status.stderr
    report = sh([str(bin_ / "dreamlook-batch"), "report", "jobs/example.yaml"], clone)
    assert report.returncode == 2 and "dreamlook-batch report jobs/example.yaml --simulate" in report.stderr

    # The commands the demo printed work.
    status = sh([str(bin_ / "dreamlook-batch"), "status", "jobs/example.yaml", "--simulate"], clone)
    assert status.returncode == 0, status.stderr
    for job_id in ("alice", "alice-portraits", "bob-all-in-one"):
        assert job_id in status.stdout
    assert "3 jobs: 3 done" in status.stdout
    page.unlink()
    report = sh([str(bin_ / "dreamlook-batch"), "report", "jobs/example.yaml", "--simulate"], clone)
    assert report.returncode == 0 and page.exists() and f"report: {page}" in report.stdout
    assert "alice-portraits" in page.read_text()
    # Nothing of the rehearsal became the real state.
    assert not (clone / "jobs" / ".dreamlook-batch" / "example.db").exists()


def test_status_before_anything_ran_says_so(tmp_path: Path) -> None:
    manifest = write(
        tmp_path / "m.yaml",
        "campaign: m\njobs:\n  - {id: a, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5}\n",
    )
    done = sh([*CLI, "status", str(manifest)], ROOT)
    assert done.returncode == 1 and "nothing has run for this campaign" in done.stderr
    assert "--simulate" not in done.stderr  # no rehearsal either: no hint about one


def test_the_summary_names_the_campaign_as_typed_not_a_placeholder(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = write(
        tmp_path / "sub dir" / "fails.yaml",
        "campaign: fails\njobs:\n"
        "  - {id: doomed, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5}\n"
        "  - {id: fine, type: image_gen, prompt: q, base_model: stable-diffusion-v1-5}\n",
    )
    plan = FaultPlan(script=(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.FAIL_JOB, nth=1),))
    with threaded_sim(fast_sim(faults=plan)) as sim:
        proc = cli_process(manifest, sim, "--max-active", "1")
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "MANIFEST" not in out
    assert f"`dreamlook-batch status '{manifest}'` lists every job with its reason" in out
    assert f"`dreamlook-batch report '{manifest}'` writes a page to review" in out


@pytest.mark.parametrize("columns", ["60", None])  # a narrow terminal's width, and a pipe's default (80)
def test_status_never_cuts_a_job_id(tmp_path: Path, threaded_sim: Any, columns: str | None) -> None:
    manifest = write(
        tmp_path / "long.yaml",
        "campaign: long\njobs:\n"
        + "".join(
            f"  - {{id: {job_id}, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5}}\n"
            for job_id in LONG_IDS
        ),
    )
    with threaded_sim(fast_sim()) as sim:
        proc = cli_process(manifest, sim)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    done = sh([*CLI, "status", str(manifest)], ROOT, **({"COLUMNS": columns} if columns else {}))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for job_id in LONG_IDS:
        assert sum(job_id in line for line in lines) == 1, done.stdout  # whole, on one line
    table = [line for line in lines if not line.startswith("files in ")]  # a path is printed whole
    assert max(len(line) for line in table) <= int(columns or 80), done.stdout  # and the table fits
    assert "done" in done.stdout  # the state gives way last
    if columns:
        assert "too narrow for" in done.stdout and "`status --json` has every field" in done.stdout


def test_status_through_a_pipe_keeps_the_other_columns_when_they_fit(tmp_path: Path, threaded_sim: Any) -> None:
    manifest = write(
        tmp_path / "short.yaml",
        "campaign: short\njobs:\n  - {id: a, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5}\n",
    )
    with threaded_sim(fast_sim()) as sim:
        proc = cli_process(manifest, sim, *FAST_CLI)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    done = sh([*CLI, "status", str(manifest)], ROOT, COLUMNS="200")
    header = next(line for line in done.stdout.splitlines() if "job" in line and "state" in line)
    for column in ("files", "remote id", "type", "age"):
        assert column in header
    assert "too narrow" not in done.stdout


def test_the_summary_shows_a_database_state_without_its_password(
    tmp_path: Path, threaded_sim: Any, pg_url: str
) -> None:
    scheme, rest = pg_url.split("://", 1)
    host = rest.rsplit("@", 1)[-1]
    with_password = f"{scheme}://postgres:pw-never-shown@{host}"  # trust auth: the password is not checked
    manifest = write(
        tmp_path / "pg.yaml",
        "campaign: pg\njobs:\n  - {id: doomed, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5}\n",
    )
    plan = FaultPlan(script=(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.FAIL_JOB, nth=1),))
    with threaded_sim(fast_sim(faults=plan)) as sim:
        proc = cli_process(manifest, sim, "--state", with_password)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "pw-never-shown" not in out
    assert f"`dreamlook-batch status {manifest} --state postgresql://postgres@{host}`" in out
