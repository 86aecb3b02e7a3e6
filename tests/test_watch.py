"""What people see: the HTML report in a real browser, the live view in a real terminal,
and log lines that parse and never carry a secret."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault

from .conftest import fast_sim, in_terminal, write

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAST = ["--max-active", "50", "--submit-rate", "500", "--requests-per-s", "2000", "--time-scale", "20000"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (.ci/run does)")
        pytest.skip("chromium is not installed here")
    return found


def test_report_renders_every_job_with_its_state_and_every_image(
    tmp_path: Path, threaded_sim: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    browser = chromium()
    manifest = write(
        tmp_path / "rep.yaml",
        "campaign: rep\njobs:\n"
        "  - {id: pics, type: image_gen, prompt: p, base_model: stable-diffusion-v1-5, num_samples: 3}\n"
        "  - {id: more-pics, type: image_gen, prompt: q, base_model: stable-diffusion-v1-5, num_samples: 2}\n"
        "  - {id: doomed, type: dreambooth, instance_prompt: p, image_urls: [u], base_model: stable-diffusion-v1-5}\n"
        "  - {id: model, type: dreambooth, instance_prompt: p, image_urls: [u], base_model: stable-diffusion-v1-5}\n",
    )
    plan = FaultPlan(script=(ScriptedFault(route=Route.SUBMIT, kind=FaultKind.FAIL_JOB, nth=3),))
    with threaded_sim(fast_sim(faults=plan)) as sim:
        monkeypatch.setenv("DREAMLOOK_API_KEY", sim.api_key)
        monkeypatch.setenv("DREAMLOOK_API_URL", sim.url)
        assert main(["run", str(manifest), *FAST, "--max-active", "1"]) == 1  # one job fails
    assert main(["report", str(manifest)]) == 0
    page = tmp_path / "outputs" / "rep" / "report.html"
    assert str(page) in capsys.readouterr().out
    dom = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    states = dict(re.findall(r"<tr class=\"[^\"]*\" data-job=\"([^\"]+)\" data-state=\"([^\"]+)\">", dom))
    assert states == {"pics": "done", "more-pics": "done", "doomed": "failed", "model": "done"}
    doomed_row = re.search(r'<tr class="bad" data-job="doomed".*?</tr>', dom, re.S)
    assert doomed_row and re.search(r'class="reason">\w+', doomed_row.group(0))  # the reason shows
    images = re.findall(r"<img [^>]*>", dom)
    assert len(images) == 5 and all('data-loaded="yes"' in img for img in images), images
    assert 'data-images="5/5"' in dom
    assert dom.count("safetensors</a>") == 2  # model: checkpoint and LoRA links; doomed has none


def test_live_view_draws_in_a_terminal_and_ends_cleanly(tmp_path: Path) -> None:
    shutil.copy(JOBS / "example.yaml", tmp_path / "example.yaml")
    env = {"COLUMNS": "100", "LINES": "30", "TERM": "xterm-256color"}  # a terminal of 100 columns
    code, text = in_terminal(["run", "example.yaml", "--simulate"], tmp_path, env, timeout_s=60)
    assert code == 0, text[-2000:]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "dreamlook-batch campaign example" in plain  # the view was drawn
    assert text.count("\x1b[?25l") >= 1 and text.rfind("\x1b[?25h") > text.rfind("\x1b[?25l")  # cursor back
    assert "run finished in" in plain and "3 done" in plain
    assert (tmp_path / "outputs" / "example" / "alice" / "SHA256SUMS").exists()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_log_lines_parse_and_never_carry_a_secret(tmp_path: Path, threaded_sim: Any, log_format: str) -> None:
    shutil.copy(JOBS / "example.yaml", tmp_path / "example.yaml")
    script = (ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.RESET, nth=2),)  # a retry, logged with its URL
    with threaded_sim(fast_sim(image_url_ttl_s=0.3 * 20_000, faults=FaultPlan(script=script))) as sim:
        env = {**os.environ, "DREAMLOOK_API_KEY": sim.api_key}
        args = [
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            str(tmp_path / "example.yaml"),
            "--api-url",
            sim.url,
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            log_format,
            "-vv",
            *FAST,
        ]
        done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        key = sim.api_key
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) > 20  # -vv: every event is there
    if log_format == "json":
        events = [json.loads(line) for line in lines]
        assert all({"ts", "level", "event", "logger"} <= e.keys() for e in events)
        names = {e["event"] for e in events}
        assert {"job.submitted", "job.succeeded", "file.done", "job.done", "callback.accepted"} <= names
    everything = done.stdout + done.stderr
    assert key not in everything and key[3:] not in everything
    assert "X-Goog-Signature" not in everything and "token=" not in everything
