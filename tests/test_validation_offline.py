"""Mistakes caught offline, before money is spent: through the real CLI, each bad input exits 2
with its file, line and job and what to do, and the simulator's ledger shows no request."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import build_parser, main
from orchestrator.manifest import fields, limits
from orchestrator.manifest.load import load_manifest
from orchestrator.models import JobType
from orchestrator.sim import Simulator

from .conftest import fast_sim, write
from .simhttp import DB_BODY, IG_BODY, Http
from .test_cli import FAST, run
from .test_cli import keyed as keyed  # a fixture: sets the simulator's URL and key in the environment

# Every way a manifest reaches the API: each must stop before the first request.
COMMANDS = (["validate"], ["plan"], ["run"], ["run", "--simulate"])

DB = "type: dreambooth, base_model: stable-diffusion-v1-5, instance_prompt: p, image_urls: [https://example.com/1.jpg]"
IG = "type: image_gen, base_model: stable-diffusion-v1-5, prompt: p"


def refused_everywhere(manifest: Path, sim: Any, capsys: pytest.CaptureFixture[str], expected: list[str]) -> None:
    """Each command exits 2, says every expected line and that nothing was sent; nothing reaches
    the simulator and no state is made."""
    for command in COMMANDS:
        code, _, err = run([*command, str(manifest), *(FAST if command[0] == "run" else [])], capsys)
        assert code == 2, (command, err)
        for line in expected:
            assert line in err, (command, line, err)
        assert "nothing was sent" in err
    assert sum(sim.ledger.requests.values()) == 0 and sim.ledger.jobs == []
    assert not (manifest.parent / ".dreamlook-batch").exists()


def test_numeric_fields_out_of_range_exit_2_naming_file_line_job_and_fix(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    m = write(
        tmp_path / "m.yaml",
        "jobs:\n"
        f"  - {{id: neg-steps, {DB}, steps: -5}}\n"
        f"  - {{id: neg-samples, {IG}, num_samples: -3}}\n"
        f"  - {{id: zero-width, {IG}, width: 0}}\n"
        f"  - {{id: low-seed, {IG}, seed: -2}}\n"
        f"  - {{id: zero-denoise, {IG}, num_inference_steps: 0}}\n"
        f"  - {{id: zero-rate, {DB}, learning_rate: 0}}\n"
        f"  - {{id: nan-rate, {DB}, learning_rate: .nan}}\n"
        f"  - {{id: neg-te, {DB}, learning_rate_te: -1.0e-6}}\n"
        f"  - {{id: late-save, {DB}, steps: 800, save_checkpoints_at: [400, 900]}}\n"
        f"  - id: combined\n    type: dreambooth_image_gen\n"
        "    dreambooth: {base_model: stable-diffusion-v1-5, instance_prompt: p, image_urls: [https://e.com/1.jpg]}\n"
        "    image_gen: [{prompt: p, num_samples: 2}, {prompt: q, height: -512}]\n",
    )
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        refused_everywhere(
            m,
            sim,
            capsys,
            [
                f"{m}:2: job 'neg-steps': field steps is -5: give at least 1 (training steps; the docs use 1200)",
                f"{m}:3: job 'neg-samples': field num_samples is -3: give at least 1 (images; 1 to 8 is usual)",
                f"{m}:4: job 'zero-width': field width is 0: give at least 1 (pixels; 512 or 1024 is usual)",
                f"{m}:5: job 'low-seed': field seed is -2: give at least -1 (a seed; -1 for random",
                f"{m}:6: job 'zero-denoise': field num_inference_steps is 0: give at least 1 (denoising steps",
                f"{m}:7: job 'zero-rate': field learning_rate is 0: give more than 0 (a learning rate; the docs use",
                f"{m}:8: job 'nan-rate': field learning_rate is nan: give a finite number",
                f"{m}:9: job 'neg-te': field learning_rate_te is -1e-06: give at least 0",
                f"{m}:10: job 'late-save': field save_checkpoints_at holds 900, past the last of 800 steps: "
                "no checkpoint would be saved there; lower it or raise steps",
                f"{m}:11: job 'combined': field image_gen[1].height is -512: give at least 1 (pixels",
                "10 error(s): nothing was sent",
            ],
        )


def test_legal_but_unusual_values_warn_and_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = write(
        tmp_path / "m.yaml",
        "jobs:\n"
        f"  - {{id: long, {DB}, steps: 6000, learning_rate: 0.01}}\n"
        f"  - {{id: odd, {IG}, width: 500, num_samples: 100, guidance_scale: 0.5}}\n",
    )
    code, out, err = run(["validate", str(m)], capsys)
    assert code == 0 and "OK" in out
    for said in [
        f"{m}:2: job 'long': warning: field steps is 6000: unusual for training steps (the docs use 1200); "
        "is it meant?",
        f"{m}:2: job 'long': warning: field learning_rate is 0.01: unusual for a learning rate",
        f"{m}:3: job 'odd': warning: field width is 500: not a multiple of 8 pixels; "
        "the service may round or refuse it",
        f"{m}:3: job 'odd': warning: field num_samples is 100: unusual for images",
        f"{m}:3: job 'odd': warning: field guidance_scale is 0.5: unusual for a guidance factor",
    ]:
        assert said in err, err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "M", "--max-new-jobs", "-1"], "argument --max-new-jobs: '-1': give a whole number of at least 0"),
        (["run", "M", "--submit-rate", "nan"], "argument --submit-rate: 'nan' is not a finite number"),
        (["run", "M", "--requests-per-s=-inf"], "argument --requests-per-s: '-inf' is not a finite number"),
        (["run", "M", "--api-timeout", "inf"], "argument --api-timeout: 'inf' is not a finite number"),
        (["run", "M", "--time-scale", "0"], "argument --time-scale: '0': give a number above 0"),
        (["run", "M", "--max-active", "0"], "argument --max-active: '0': give a whole number of at least 1"),
        (["run", "M", "--max-active", "1.5"], "argument --max-active: '1.5' is not a whole number"),
        (["run", "M", "--max-downloads", "-2"], "argument --max-downloads: '-2': give a whole number of at least 1"),
        (["run", "M", "--connections-per-file", "0"], "argument --connections-per-file: '0': give a whole number"),
        (["run", "M", "--range-mb", "nan"], "argument --range-mb: 'nan' is not a finite number"),
        (["run", "M", "--parallel-min-mb", "-1"], "argument --parallel-min-mb: '-1': give a number of at least 0"),
        (["run", "M", "--reconcile-grace", "-5"], "argument --reconcile-grace: '-5': give a number of at least 0"),
        (["run", "M", "--lease-s", "nan"], "argument --lease-s: 'nan' is not a finite number"),
        (["jobs", "list", "dreambooth", "--limit", "-1"], "argument --limit: '-1': give a whole number of at least 1"),
        (["jobs", "list", "dreambooth", "--limit", "0"], "argument --limit: '0': give a whole number of at least 1"),
        (["sim", "--port", "70000"], "argument --port: '70000': give a whole number from 0 to 65535"),
        (["sim", "--time-scale", "nan"], "argument --time-scale: 'nan' is not a finite number"),
        (["sim", "--failure-rate", "1.5"], "argument --failure-rate: '1.5': give a number from 0 to 1"),
        (["sim", "--capacity", "0"], "argument --capacity: '0': give a whole number of at least 1"),
        (["sim", "--tokens", "-1"], "argument --tokens: '-1': give a whole number of at least 0"),
        (["sim", "--job-seconds", "-1"], "argument --job-seconds: '-1': give a number of at least 0"),
        (["sim", "--bandwidth-mb", "0"], "argument --bandwidth-mb: '0': give a number above 0"),
        (["sim", "--requests-per-s", "nan"], "argument --requests-per-s: 'nan' is not a finite number"),
    ],
)
def test_numeric_options_that_make_no_sense_are_usage_errors(
    argv: list[str],
    said: str,
    tmp_path: Path,
    threaded_sim: Any,
    keyed: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # One more mistake, found later (a manifest's, a fault's): were the option let through, this
    # test would fail at once instead of running a campaign paced by it, or serving for ever.
    manifest = write(tmp_path / "m.yaml", f"jobs:\n  - {{id: a, {DB}, steps: -1}}\n")
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        later = ["--fault", "no-such-fault=1"] if argv[0] == "sim" else []
        with pytest.raises(SystemExit) as exited:
            main([*(str(manifest) if a == "M" else a for a in argv), *later])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert said in err and "usage:" in err, err
        assert sum(sim.ledger.requests.values()) == 0
    assert not (tmp_path / ".dreamlook-batch").exists()


def test_a_port_out_of_range_in_listen_or_callback_url_is_a_usage_error(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write(tmp_path / "m.yaml", f"jobs:\n  - {{id: a, {DB}}}\n")
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        with pytest.raises(SystemExit) as exited:
            main(["run", str(manifest), *FAST, "--listen", "127.0.0.1:99999"])
        assert exited.value.code == 2
        assert "argument --listen: give HOST:PORT (a port from 0 to 65535)" in capsys.readouterr().err
        url = "http://example.com:99999/cb"
        code, _, err = run(["run", str(manifest), *FAST, "--callback-url", url], capsys)
        assert code == 2 and f"--callback-url '{url}': give an http(s) URL that reaches this machine" in err, err
        assert sum(sim.ledger.requests.values()) == 0


def test_a_fault_rate_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for rate in ("nan", "2", "-0.1"):
        # A second, unknown fault after it: were the rate let through, this fails instead of serving for ever.
        code, _, err = run(["sim", "--fault", f"slow={rate}", "--fault", "no-such-fault=1"], capsys)
        assert code == 2 and f"--fault 'slow={rate}'" in err and "give a number from 0 to 1" in err, err


def test_edge_values_that_make_sense_are_accepted() -> None:
    parser = build_parser()
    args = parser.parse_args(
        "run m.yaml --max-new-jobs 0 --reconcile-grace 0 --parallel-min-mb 0 --max-active 1".split()
    )
    assert (args.max_new_jobs, args.reconcile_grace, args.parallel_min_mb, args.max_active) == (0, 0.0, 0.0, 1)
    args = parser.parse_args("sim --port 0 --seed -7 --failure-rate 1 --tokens 0".split())
    assert (args.port, args.seed, args.failure_rate, args.tokens) == (0, -7, 1.0, 0)


def test_a_folder_as_the_manifest_is_named_as_such_with_the_manifests_inside(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "campaigns"
    write(folder / "spring.yaml", f"jobs:\n  - {{id: a, {DB}}}\n")
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        for command in COMMANDS:
            code, _, err = run([*command, str(folder)], capsys)
            assert code == 2
            assert f"{folder}: is a folder, not a manifest: name the file itself (it holds spring.yaml)" in err
            assert "no such file" not in err and "nothing was sent" in err
        assert sum(sim.ledger.requests.values()) == 0
    assert not (folder / ".dreamlook-batch").exists() and not (tmp_path / ".dreamlook-batch").exists()


BULK = """
bulk:
  - rows: subjects.csv
    template:
      id: "subject-{name}"
      type: dreambooth
      base_model: stable-diffusion-v1-5
      instance_prompt: "photo of {token} person"
      image_urls: "{photos}"
      steps: "{steps}"
"""


def test_a_spreadsheet_csv_with_a_byte_order_mark_runs_with_its_first_column(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    m = write(tmp_path / "bulk.yaml", BULK)
    (tmp_path / "subjects.csv").write_bytes(
        codecs.BOM_UTF8 + b"name,token,steps,photos\r\nada,ukj,100,https://example.com/ada/1.jpg\r\n"
    )
    code, out, err = run(["validate", str(m)], capsys)
    assert code == 0 and "1 jobs (1 dreambooth)" in out, err
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        code, out, err = run(["run", str(m), *FAST], capsys)
        assert code == 0, out + err
        [job] = sim.ledger.jobs
    assert job.config["instance_prompt"] == "photo of ukj person" and job.config["steps"] == 100
    assert {"key": "dreamlook-batch", "value": "bulk/subject-ada"} in job.tags


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_european_spreadsheet_csv_with_semicolons_or_tabs_reads_as_it_should(tmp_path: Path, separator: str) -> None:
    m = write(tmp_path / "bulk.yaml", BULK)
    rows = ["name", "token", "steps", "photos"], ["ada", "ukj", "100", "https://e.com/1.jpg|https://e.com/2.jpg"]
    text = "\r\n".join(separator.join(row) for row in rows) + "\r\n"
    (tmp_path / "subjects.csv").write_bytes(codecs.BOM_UTF8 + text.encode())
    [job] = load_manifest(m).jobs
    assert job.id == "subject-ada" and job.payload["steps"] == 100
    assert job.payload["image_urls"] == ["https://e.com/1.jpg", "https://e.com/2.jpg"]


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".jsonl"])
def test_a_byte_order_mark_is_dropped_from_every_manifest_kind(tmp_path: Path, suffix: str) -> None:
    job = {"id": "a", "type": "image_gen", "prompt": "p", "base_model": "stable-diffusion-v1-5"}
    text = json.dumps(job) if suffix == ".jsonl" else json.dumps({"jobs": [job]})
    path = tmp_path / f"m{suffix}"
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    assert [j.id for j in load_manifest(path).jobs] == ["a"]


def test_a_utf16_csv_says_how_to_save_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = write(tmp_path / "bulk.yaml", BULK)
    (tmp_path / "subjects.csv").write_bytes(
        "name,token,steps,photos\nada,ukj,100,https://e.com/1.jpg\n".encode("utf-16")
    )
    code, _, err = run(["validate", str(m)], capsys)
    assert code == 2
    assert f"{tmp_path / 'subjects.csv'}: is UTF-16 text" in err and "save it as UTF-8" in err


def test_urls_separated_by_commas_in_a_csv_cell_name_file_line_column_and_job(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    m = write(tmp_path / "bulk.yaml", BULK)
    write(
        tmp_path / "subjects.csv",
        "name,token,steps,photos\n"
        'ada,ukj,100,"https://e.com/ada/1.jpg,https://e.com/ada/2.jpg"\n'
        "bob,zwx,100,https://e.com/bob/1.jpg|https://e.com/bob/2.jpg\n"
        'cy,sks,100,"https://e.com/cy/1.jpg, https://e.com/cy/2.jpg"\n',
    )
    rows = tmp_path / "subjects.csv"
    fix = "separates its URLs with commas; separate several URLs with spaces or | (a comma can be part of a URL)"
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        refused_everywhere(
            m,
            sim,
            capsys,
            [
                f"{rows}:2: job 'subject-ada': column 'photos' {fix}",
                f"{rows}:4: job 'subject-cy': column 'photos' {fix}",
            ],
        )
        _, _, err = run(["validate", str(m)], capsys)
        assert "subject-bob" not in err and "2 error(s)" in err  # one problem said once per row


def test_a_comma_inside_one_url_is_not_a_separator(tmp_path: Path) -> None:
    m = write(tmp_path / "bulk.yaml", BULK)
    cdn = "https://res.cloudinary.com/demo/image/upload/w_300,h_200/ada.jpg"
    write(tmp_path / "subjects.csv", f'name,token,steps,photos\nada,ukj,100,"{cdn} https://e.com/2.jpg"\n')
    [job] = load_manifest(m).jobs
    assert job.payload["image_urls"] == [cdn, "https://e.com/2.jpg"]


def test_urls_joined_by_a_comma_in_a_yaml_list_item(
    tmp_path: Path, threaded_sim: Any, keyed: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    m = write(
        tmp_path / "m.yaml",
        "jobs:\n  - id: a\n    type: dreambooth\n    base_model: stable-diffusion-v1-5\n    instance_prompt: p\n"
        '    image_urls: ["https://e.com/1.jpg, https://e.com/2.jpg"]\n',
    )
    with threaded_sim(fast_sim()) as sim:
        keyed(sim)
        refused_everywhere(
            m,
            sim,
            capsys,
            [
                f"{m}:2: job 'a': field image_urls[0]: 'https://e.com/1.jpg, https://e.com/2.jpg' holds URLs joined "
                "by a comma; give each URL as its own list item"
            ],
        )


REFUSED = [(name, rule) for name, rule in limits.RULES.items() if rule.refused]


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "rule"), REFUSED, ids=[name for name, _ in REFUSED])
async def test_each_range_the_client_enforces_as_the_api_would_the_simulator_refuses_too(
    name: str, rule: limits.Rule, tmp_path: Path
) -> None:
    """What `validate` refuses because the service would answer 422, the simulator answers 422:
    a rehearsal fails where the service would. Just inside the range, both accept."""
    kind = JobType.DREAMBOOTH if name in fields.DREAMBOOTH else JobType.IMAGE_GEN
    body = DB_BODY if kind is JobType.DREAMBOOTH else IG_BODY
    assert rule.low is not None and not rule.low_open  # a refused rule is an integer floor
    outside, inside = int(rule.low) - 1, int(rule.low)
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        status, data, _ = await http.call("POST", f"/{kind.value}", json={**body, name: outside, "dry_run": True})
        assert status == 422 and [d["loc"] for d in data["detail"]] == [["body", name]], data
        status, data, _ = await http.call("POST", f"/{kind.value}", json={**body, name: inside, "dry_run": True})
        assert status == 200, data
    errors, _ = fields.check_payload(kind, {**body, name: outside})
    assert [e for e in errors if name in e], errors
    errors, _ = fields.check_payload(kind, {**body, name: inside})
    assert errors == []
