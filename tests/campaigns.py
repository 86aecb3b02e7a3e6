"""Generated manifests for end-to-end tests, and the checks a user would make afterwards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from orchestrator.sim import Simulator

IMAGES = ["https://example.com/s/1.jpg", "https://example.com/s/2.jpg"]


def mixed_manifest(folder: Path, *, trainings: int = 80, combined: int = 60, plain_images: int = 80) -> Path:
    """trainings x (dreambooth + a dependent image_gen) + combined + plain image jobs."""
    lines = [
        "campaign: mixed",
        "defaults:",
        "  dreambooth: {base_model: stable-diffusion-v1-5, steps: 1000, learning_rate: 1.0e-6}",
        "  image_gen: {num_samples: 2, width: 512, height: 512}",
        "jobs:",
    ]
    for i in range(trainings):
        download = "  download: [lora]\n" if i % 3 == 0 else ""
        lines.append(
            f"- id: t{i:03d}\n  type: dreambooth\n  instance_prompt: photo of p{i}\n  image_urls: {IMAGES}\n{download}"
        )
        lines.append(f"- id: t{i:03d}-img\n  type: image_gen\n  checkpoint_from: t{i:03d}\n  prompt: portrait of p{i}")
    for i in range(combined):
        lines.append(
            f"- id: c{i:03d}\n  type: dreambooth_image_gen\n"
            f"  dreambooth: {{instance_prompt: photo of q{i}, image_urls: {IMAGES}, extract_lora: disabled}}\n"
            f"  image_gen: [{{prompt: q{i} on the moon, num_samples: 1}}]"
        )
    for i in range(plain_images):
        lines.append(f"- id: g{i:03d}\n  type: image_gen\n  base_model: realistic-vision-v5-1\n  prompt: landscape {i}")
    path = folder / "mixed.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_campaign_on_disk(sim: Simulator, out: Path, campaign: str, job_ids: list[str]) -> int:
    """Every chosen file of every job is on disk with the bytes the simulator made; returns files checked."""
    tags = sim.ledger.tag_values()
    assert len(sim.ledger.jobs) == len(job_ids), "the ledger holds a job per manifest job, no more"
    assert {f"{campaign}/{j}" for j in job_ids} == set(tags) and set(tags.values()) == {1}
    remote_of = {next(t["value"] for t in e.tags if t["key"] == "dreamlook-batch"): e.job_id for e in sim.ledger.jobs}
    checked = 0
    for job_id in job_ids:
        folder = out / job_id
        expected = sim.expected_files(remote_of[f"{campaign}/{job_id}"])
        sums = {
            name: digest
            for digest, name in (line.split("  ", 1) for line in (folder / "SHA256SUMS").read_text().splitlines())
        }
        assert sums, f"{job_id}: no files"
        for name, digest in sums.items():
            assert expected[name] == digest, f"{job_id}/{name}: SHA256SUMS disagrees with the simulator"
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{job_id}/{name}: bytes"
            checked += 1
        assert not list(folder.glob("*.part")), f"{job_id}: a .part file was left"
        job = json.loads((folder / "job.json").read_text())
        assert "X-Goog-Signature" not in json.dumps(job)
    return checked
