"""Signed storage of the simulator: bytes, Range, hashes, expiry, renewal, retention."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import google_crc32c
import pytest

from orchestrator.sim import FileContent, Simulator, expected_sha256

from .conftest import fast_sim
from .simhttp import DB_BODY, IG_BODY, Http
from .test_sim_api import wait_state

pytestmark = pytest.mark.anyio


async def trained(http: Http, **extra: object) -> dict[str, Any]:
    db = await http.submit("dreambooth", {**DB_BODY, **extra})
    return await wait_state(http, "dreambooth", db, {"success"})


async def test_checkpoint_bytes_are_deterministic_safetensors_with_the_expected_sha() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        job = await trained(http)
        expected = sim.expected_files(job["job_id"])
        for ckp in job["dreambooth_result"]["checkpoints"]:
            status, body, headers = await http.raw(ckp["url"])
            assert status == 200 and len(body) == ckp["size_bytes"] == int(headers["Content-Length"])
            name = urlsplit(ckp["url"]).path.rsplit("/", 1)[-1]
            assert hashlib.sha256(body).hexdigest() == expected[name]
            # Uploaded whole (not composite): md5 and crc32c of the whole object, as GCS sends them.
            hashes = dict(item.split("=", 1) for item in headers["x-goog-hash"].split(","))
            assert base64.b64decode(hashes["md5"]) == hashlib.md5(body).digest()
            assert base64.b64decode(hashes["crc32c"]) == google_crc32c.Checksum(body).digest()  # type: ignore[no-untyped-call]
            (length,) = struct.unpack("<Q", body[:8])
            header = json.loads(body[8 : 8 + length])
            assert 8 + length + header["weight"]["data_offsets"][1] == len(body)


def test_expected_sha256_is_computable_without_the_simulator_and_differs_per_file() -> None:
    a = FileContent(key="0/ckp_1", size=3 * 1024 * 1024 + 1, safetensors=True)
    b = FileContent(key="0/ckp_2", size=3 * 1024 * 1024 + 1, safetensors=True)
    assert expected_sha256(a) == expected_sha256(a) != expected_sha256(b)
    # Bytes at an offset are the same whichever way they are read (what resumes rely on).
    whole = b"".join(a.read(0, a.size))
    assert b"".join(a.read(1_000_003, 2_500_000)) == whole[1_000_003:2_500_000]


async def test_images_are_real_pngs() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        ig = await http.submit("image_gen", IG_BODY)
        job = await wait_state(http, "image_gen", ig, {"success"})
        for image in job["image_gen_results"][0]["generated_images"]:
            status, body, headers = await http.raw(image["url"])
            assert status == 200 and headers["Content-Type"] == "image/png"
            assert body[:8] == b"\x89PNG\r\n\x1a\n"
            idat = body[body.index(b"IDAT") + 4 :]
            assert zlib.decompressobj().decompress(idat)  # a valid deflate stream


async def test_range_requests_answer_206_with_content_range() -> None:
    async with Simulator(fast_sim()) as sim, Http(sim) as http:
        url = (await trained(http))["dreambooth_result"]["checkpoints"][0]["url"]
        _, whole, _ = await http.raw(url)
        size = len(whole)
        for header, lo, hi in (("bytes=10-19", 10, 20), ("bytes=1000-", 1000, size), ("bytes=-7", size - 7, size)):
            status, body, headers = await http.raw(url, {"Range": header})
            assert status == 206 and body == whole[lo:hi]
            assert headers["Content-Range"] == f"bytes {lo}-{hi - 1}/{size}"
            assert int(headers["Content-Length"]) == hi - lo
        status, _, headers = await http.raw(url, {"Range": f"bytes={size}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}"


async def test_bad_signature_is_403_and_expiry_is_400_with_gcs_xml() -> None:
    async with Simulator(fast_sim(image_url_ttl_s=1.0 * 20_000)) as sim, Http(sim) as http:
        # image URL TTL: 1 real second
        ig = await http.submit("image_gen", IG_BODY)
        job = await wait_state(http, "image_gen", ig, {"success"})
        url = job["image_gen_results"][0]["generated_images"][0]["url"]
        assert parse_qs(urlsplit(url).query)["X-Goog-Expires"] == ["1"]
        status, body, _ = await http.raw(url.replace("X-Goog-Signature=", "X-Goog-Signature=0"))
        assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body
        await anyio.sleep(2.1)
        status, body, _ = await http.raw(url)
        assert status == 400 and b"<Code>ExpiredToken</Code>" in body
        # Every GET of the job re-signs: the fresh URL works.
        fresh = (await http.job("image_gen", ig))["image_gen_results"][0]["generated_images"][0]["url"]
        assert fresh != url
        status, body, _ = await http.raw(fresh)
        assert status == 200 and body.startswith(b"\x89PNG")


async def test_retention_deletes_files_and_marks_them_unavailable() -> None:
    async with Simulator(fast_sim(retention_s=1.0 * 20_000)) as sim, Http(sim) as http:  # 1 real second
        job = await trained(http)
        await anyio.sleep(1.2)
        again = await http.job("dreambooth", job["job_id"])
        ckp = again["dreambooth_result"]["checkpoints"][0]
        assert ckp["is_available"] is False
        status, body, _ = await http.raw(ckp["url"])
        assert status == 404 and b"NoSuchKey" in body
        # A deleted checkpoint cannot seed new generations.
        status, data, _ = await http.call(
            "POST", "/image_gen", json={"prompt": "x", "checkpoint_id": ckp["checkpoint_id"]}
        )
        assert status == 422 and "deleted" in data["detail"][0]["msg"]


async def test_multi_gb_file_streams_whole_without_being_held_in_memory() -> None:
    import resource

    import aiohttp

    size = 2 * 1024**3 + 17  # past 2 GiB: no 32-bit offset survives it
    async with Simulator(fast_sim(checkpoint_bytes=size)) as sim, Http(sim) as http:
        job = await trained(http, extract_lora="disabled")
        url = job["dreambooth_result"]["checkpoints"][0]["url"]
        name = urlsplit(url).path.rsplit("/", 1)[-1]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        digest, received, largest = hashlib.sha256(), 0, 0
        async with aiohttp.ClientSession() as bare, bare.get(url) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) == size
            # A composite object (as large GCS uploads are): crc32c only, no md5.
            (goog_hash,) = resp.headers.getall("x-goog-hash")
            assert goog_hash.startswith("crc32c=") and "md5=" not in goog_hash
            crc = google_crc32c.Checksum()  # type: ignore[no-untyped-call]
            async for chunk in resp.content.iter_chunked(1 << 20):
                digest.update(chunk)
                crc.update(chunk)  # type: ignore[no-untyped-call]
                received += len(chunk)
                largest = max(largest, len(chunk))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        expected = sim.expected_files(job["job_id"])[name]
    assert received == size and digest.hexdigest() == expected  # every byte, the right bytes
    assert goog_hash == "crc32c=" + base64.b64encode(crc.digest()).decode()  # type: ignore[no-untyped-call]
    assert after - before < 64 * 1024  # KiB: the server and this reader held chunks, never the file
