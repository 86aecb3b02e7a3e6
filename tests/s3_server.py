"""A real S3 HTTP server on loopback for the tests of `--out s3://`: moto in server mode
(`ThreadedMotoServer`), one per test session, a fresh bucket per test. It keeps objects in
memory (test objects stay small) and checks neither signatures nor checksums: the tests
read objects back and compare their sha256 with the simulator's."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from orchestrator.sim import Simulator

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_numbers = itertools.count()


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())

    def url(self, prefix: str = "out/") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def env(self) -> dict[str, str]:
        """What a `dreamlook-batch` process needs to reach this bucket (no --s3-endpoint-url)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def open_uploads(self) -> list[str]:
        return [u["Key"] for u in self.client().list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])]


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3:
    """A fresh, empty bucket; this process's AWS settings point at it."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = S3(s3_endpoint, f"dlb-test-{os.getpid()}-{next(_numbers)}")
    bucket.client().create_bucket(Bucket=bucket.bucket)
    return bucket


def assert_campaign_in_bucket(sim: Simulator, s3: S3, prefix: str, campaign: str, job_ids: list[str]) -> int:
    """Every chosen file of every job is in the bucket with the bytes the simulator made, and
    no upload is left open; returns the files checked."""
    remote_of = {next(t["value"] for t in e.tags if t["key"] == "dreamlook-batch"): e.job_id for e in sim.ledger.jobs}
    checked = 0
    for job_id in job_ids:
        expected = sim.expected_files(remote_of[f"{campaign}/{job_id}"])
        lines = s3.read(f"{prefix}{job_id}/SHA256SUMS").decode().splitlines()
        sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines)}
        assert sums, f"{job_id}: no files"
        for name, digest in sums.items():
            assert expected[name] == digest, f"{job_id}/{name}: SHA256SUMS disagrees with the simulator"
            assert hashlib.sha256(s3.read(f"{prefix}{job_id}/{name}")).hexdigest() == digest, f"{job_id}/{name}"
            checked += 1
        job = json.loads(s3.read(f"{prefix}{job_id}/job.json"))
        assert "X-Goog-Signature" not in json.dumps(job)
    assert s3.open_uploads() == [], "an upload was left open (its parts would be billed)"
    return checked
