"""Manifests: the examples load; each broken one is reported with its file, line and job."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ManifestError
from orchestrator.manifest.load import load_manifest
from orchestrator.models import JobType

from .conftest import write

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [str(p) for p in caught.value.problems if not p.warning]


def test_example_manifest_has_dependencies_defaults_and_selection() -> None:
    m = load_manifest(JOBS / "example.yaml")
    assert m.campaign == "example"
    alice, portraits, bob = m.jobs
    assert alice.payload["steps"] == 1200 and alice.payload["learning_rate"] == 1e-6  # from defaults
    assert alice.download == frozenset({"checkpoint", "lora"})
    assert portraits.checkpoint_from == "alice" and portraits.payload["num_samples"] == 4
    assert bob.type is JobType.DREAMBOOTH_IMAGE_GEN
    assert bob.payload["dreambooth"]["base_model"] == "stable-diffusion-v1-5"  # defaults merge into the section
    assert [g["negative_prompt"] for g in bob.payload["image_gen"]] == ["blurry, low quality"] * 2


def test_bulk_example_expands_csv_rows_with_typed_cells() -> None:
    m = load_manifest(JOBS / "bulk.yaml")
    assert [j.id for j in m.jobs] == ["subject-ada", "subject-grace", "subject-linus"]
    grace = m.jobs[1]
    assert grace.payload["steps"] == 1000 and grace.payload["instance_prompt"] == "photo of zwx person"
    assert grace.payload["image_urls"] == ["https://example.com/grace/1.jpg", "https://example.com/grace/2.jpg"]
    assert grace.location.file.endswith("subjects.csv") and grace.location.line == 3


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "m.yaml", "jobs:\n  - id: a\n    type: [dreambooth\n")
    [message] = problems(path)
    assert message.startswith(f"{path}:") and "invalid YAML" in message


def test_duplicate_ids_name_both_places(tmp_path: Path) -> None:
    body = "jobs:\n" + "".join(
        "  - id: a\n    type: image_gen\n    prompt: p\n    base_model: stable-diffusion-v1-5\n" for _ in range(2)
    )
    path = write(tmp_path / "m.yaml", body)
    [message] = problems(path)
    assert message == f"{path}:6: job 'a': duplicate job id (first defined at {path}:2)"


def test_cycle_and_unknown_reference(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.yaml",
        """
defaults: {dreambooth: {image_urls: [u], instance_prompt: p}}
jobs:
  - {id: a, type: dreambooth, checkpoint_from: b}
  - {id: b, type: dreambooth, checkpoint_from: a}
  - {id: c, type: image_gen, prompt: p, checkpoint_from: ghost}
""",
    )
    found = problems(path)
    assert f"{path}:4: job 'a': checkpoint_from makes a cycle: a -> b -> a" in found
    assert f"{path}:5: job 'b': checkpoint_from makes a cycle: b -> a -> b" in found
    assert f"{path}:6: job 'c': checkpoint_from 'ghost' names no job of this manifest" in found


def test_wrong_type_missing_field_and_forbidden_field_all_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.yaml",
        """
jobs:
  - id: a
    type: dreambooth
    instance_prompt: p
    steps: lots
  - id: b
    type: image_genn
  - id: c
    type: dreambooth
    image_urls: [u]
    instance_prompt: p
    text_encoder_training: true
  - id: bad id!
    type: image_gen
""",
    )
    found = problems(path)
    assert f"{path}:3: job 'a': missing required field image_urls" in found
    assert f"{path}:3: job 'a': field steps should be an integer, not 'lots'" in found
    assert any(m.startswith(f"{path}:7: job 'b': type 'image_genn' must be one of") for m in found)
    assert any(m.startswith(f"{path}:9: job 'c': field text_encoder_training is not allowed") for m in found)
    assert any(m.startswith(f"{path}:14: job id 'bad id!' must match") for m in found)


def test_unknown_fields_warn_and_pass(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.yaml", "jobs:\n  - {id: a, type: image_gen, prompt: p, base_model: x, new_api_field: 1}\n"
    )
    m = load_manifest(path)
    assert m.jobs[0].payload["new_api_field"] == 1
    [warning] = m.warnings
    assert warning.line == 2 and "unknown field new_api_field" in warning.message


def test_checkpoint_from_conflicts_with_a_model_and_needs_a_training_parent(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.yaml",
        """
defaults: {image_gen: {base_model: stable-diffusion-v1-5}}
jobs:
  - {id: a, type: image_gen, prompt: p}
  - {id: b, type: image_gen, prompt: p, checkpoint_from: a}
  - {id: c, type: image_gen, prompt: p, checkpoint_from: a, base_model: x}
""",
    )
    found = problems(path)
    assert f"{path}:5: job 'b': checkpoint_from 'a' is a image_gen job, which makes no checkpoint" in found
    assert any("base_model conflicts with checkpoint_from" in m and ":6:" in m for m in found)


def test_json_and_json_lines_manifests(tmp_path: Path) -> None:
    job = (
        '{"id": "a", "type": "image-gen", "prompt": "p", "base_model": "stable-diffusion-v1-5", "guidance_scale": 1e1}'
    )
    m = load_manifest(write(tmp_path / "m.json", '{"campaign": "j", "jobs": [\n' + job + "\n]}"))
    assert m.campaign == "j" and m.jobs[0].type is JobType.IMAGE_GEN and m.jobs[0].location.line == 2
    assert m.jobs[0].payload["guidance_scale"] == 10.0
    lines = write(
        tmp_path / "many.jsonl", '{"campaign": "l"}\n' + job + "\n\n" + job.replace('"a"', '"b"') + "\n{oops\n"
    )
    found = problems(lines)
    assert found == [f"{lines}:5: invalid JSON: Expecting property name enclosed in double quotes (column 2)"]
    lines.write_text('{"campaign": "l"}\n' + job + "\n" + job.replace('"a"', '"b"') + "\n")
    m = load_manifest(lines)
    assert m.campaign == "l" and [j.location.line for j in m.jobs] == [2, 3]


def test_bulk_rows_problems_name_the_csv_line(tmp_path: Path) -> None:
    write(tmp_path / "rows.csv", "name,steps\nada,800\nbob,many\n")
    path = write(
        tmp_path / "m.yaml",
        """
bulk:
  - rows: rows.csv
    template: {id: "s-{name}", type: dreambooth, instance_prompt: p, image_urls: [u], steps: "{steps}", seed: "{nope}"}
""",
    )
    found = problems(path)
    assert found == [
        f"{tmp_path / 'rows.csv'}:2: the template uses column 'nope', which this row lacks (it has: name, steps)",
        f"{tmp_path / 'rows.csv'}:3: the template uses column 'nope', which this row lacks (it has: name, steps)",
    ]
    path.write_text(path.read_text().replace(', seed: "{nope}"', ""))
    assert problems(path) == [f"{tmp_path / 'rows.csv'}:3: job 's-bob': field steps should be an integer, not 'many'"]


def test_missing_file_and_empty_manifest(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]
    assert "no jobs" in problems(write(tmp_path / "e.yaml", "campaign: x\njobs: []\n"))[0]
    assert "unknown top-level key 'job'" in problems(write(tmp_path / "t.yaml", "job: []\n"))[0]
