"""Fetching one result file straight into the bucket (`--out s3://...`), with no copy on
local disk and the promises of the local path (rule 4): nothing stands under its final
key until it is whole and verified, and a kill at any moment loses nothing received.

A file of at most one part (images, LoRAs) comes whole into memory, is verified and is
put with `If-None-Match: *`. A larger one goes up as a multipart upload whose parts are
the download's ranges: one stream from the signed URL is cut into parts, hashed in order
(`transfer/hashing.py`), and each part is uploaded (up to `parts_in_flight` at once: the
memory held is that many parts, plus the one being read) and recorded in the state store
with the digest's state after it. A restart, here or on another host of a shared campaign,
resumes the same upload from its first missing part: it takes the digest up where that
part begins and fetches only from there.

Before the upload completes: the size against the job's, storage's md5 (`x-goog-hash`)
against ours, the safetensors header. Completing is conditional (`If-None-Match: *`): an
object already at the key is kept if it has our bytes (an earlier run finished it) and
reported, left alone, if not. An upload that cannot finish (the service deleted the file,
the key is taken, the bytes were wrong) is aborted: no orphaned parts to pay for.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import anyio

from ..api import retry
from ..config import CONNECTIONS_PER_FILE, FILE_RETRY, RetryPolicy
from ..crashpoints import crash_point
from ..errors import BucketError, DownloadError, FileGone, KeyTaken, ObjectChanged, UrlExpired, VerificationFailed
from ..events import event
from ..models import Artifact
from ..store import Store, UploadedPart, UploadRecord
from . import storage
from .bucket import Bucket
from .file import Downloader, Source
from .hashing import ResumableDigest
from .progress import Transfer
from .urls import redact
from .verify import Hashes, StorageHashes, check_safetensors_head

log = logging.getLogger(__name__)
PART_MIN_BYTES = 8 * 1024 * 1024  # S3 wants 5 MiB at least for every part but the last
MAX_PARTS = 10_000  # S3's limit: larger files get larger parts


@dataclass(frozen=True, slots=True)
class Stored:
    url: str  # s3://bucket/key
    size: int
    sha256: str


class UploadLog:
    """What the state store keeps of one file's upload (`store` verbs for one job and file)."""

    def __init__(self, store: Store, job_id: str, remote_id: str) -> None:
        self.store, self.job_id, self.remote_id = store, job_id, remote_id

    async def record(self) -> UploadRecord | None:
        return await self.store.upload_record(self.job_id, self.remote_id)

    async def started(self, *, upload_id: str, key: str, part_bytes: int, size: int, source_etag: str | None) -> None:
        await self.store.upload_started(
            self.job_id,
            self.remote_id,
            upload_id=upload_id,
            key=key,
            part_bytes=part_bytes,
            size=size,
            source_etag=source_etag,
        )

    async def part_done(self, part: UploadedPart) -> None:
        await self.store.upload_part_done(self.job_id, self.remote_id, part)

    async def forget(self) -> None:
        await self.store.upload_forget(self.job_id, self.remote_id)


def part_size(size: int, part_bytes: int) -> int:
    """The parts' size: the download's range size, at least S3's minimum, and large enough
    that the file needs no more than S3's 10,000 parts."""
    return max(part_bytes, PART_MIN_BYTES, math.ceil(size / MAX_PARTS))


class BucketFetcher:
    def __init__(
        self,
        bucket: Bucket,
        downloader: Downloader,
        *,
        part_bytes: int = PART_MIN_BYTES,
        parts_in_flight: int = CONNECTIONS_PER_FILE,
        file_retry: RetryPolicy = FILE_RETRY,
    ) -> None:
        self.bucket, self.downloader = bucket, downloader  # its connections to storage, its progress display
        self.part_bytes, self.parts_in_flight, self.file_retry = part_bytes, parts_in_flight, file_retry

    async def fetch(
        self,
        artifact: Artifact,
        job_id: str,
        renew: Callable[[], Awaitable[Artifact]],
        uploads: UploadLog,
        *,
        renew_margin_s: float,
    ) -> Stored:
        with self.downloader.tracked(f"{job_id}/{artifact.name}", artifact.size_bytes) as transfer:
            return await self._fetch(artifact, job_id, renew, uploads, transfer, renew_margin_s)

    async def _fetch(
        self,
        artifact: Artifact,
        job_id: str,
        renew: Callable[[], Awaitable[Artifact]],
        uploads: UploadLog,
        transfer: Transfer,
        renew_margin_s: float,
    ) -> Stored:
        source = Source(artifact, renew)
        key = self.bucket.url.key(job_id, artifact.name)
        size = artifact.size_bytes

        async def attempt() -> Stored:
            await source.ensure_fresh(renew_margin_s)
            try:
                if size is None or size <= part_size(size, self.part_bytes):
                    return await self._whole(source, key, transfer)
                return await self._multipart(source, key, size, part_size(size, self.part_bytes), uploads, transfer)
            except UrlExpired:
                await source.renew_after(source.url)
                raise
            except (ObjectChanged, VerificationFailed):
                await self.abandon(uploads)  # those bytes are no good: the next attempt starts over
                raise
            except BucketError as exc:  # the bucket failed a request botocore already retried
                raise DownloadError(str(exc)) from exc
            except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
                where = redact(source.url)
                raise DownloadError(f"{artifact.name}: transfer broke ({type(exc).__name__}) from {where}") from exc

        try:
            return await retry.file_attempts(attempt, self.file_retry, artifact.name)
        except (FileGone, KeyTaken):
            await self.abandon(uploads)  # it can never finish: no parts left to pay for
            raise

    async def abandon(self, uploads: UploadLog) -> None:
        """Abort the file's upload, if one is recorded, and forget it (its bytes are of no use)."""
        record = await uploads.record()
        if record is None:
            return
        try:
            await self.bucket.abort(record.key, record.upload_id)
        except BucketError as exc:  # kept on record; the lifecycle rule in the README is the second net
            event(log, "upload.abort_failed", key=record.key, reason=exc)
            return
        await uploads.forget()

    # -- one PUT ------------------------------------------------------------------------

    async def _whole(self, source: Source, key: str, transfer: Transfer) -> Stored:
        artifact = source.artifact
        async with self.downloader.session.get(source.url) as resp:
            await storage.raise_for_status(resp, artifact.name)
            if resp.status != 200:
                raise DownloadError(f"{artifact.name}: storage answered {resp.status} to a request for the whole file")
            expected = storage.storage_hashes(resp)
            data = await resp.read()
        transfer.start_at(0)
        transfer.add(len(data))
        digest = Digest()
        digest.update(data)
        _verify(artifact, digest, expected)
        if artifact.name.endswith(".safetensors"):
            check_safetensors_head(artifact.name, data, len(data))
        try:
            await self.bucket.put_new(key, data, md5_b64=digest.md5_b64())
        except KeyTaken:
            await self._keep_if_ours(key, digest.size, digest.sha256_hex())
        return self._stored(key, digest)

    def _stored(self, key: str, digest: Digest | ResumableDigest) -> Stored:
        return Stored(self.bucket.url.url_of(key), digest.size, digest.sha256_hex())

    async def _keep_if_ours(self, key: str, size: int, sha256: str) -> None:
        """An object is already at `key`: an earlier run's, with these very bytes, is kept."""
        there = await self.bucket.read_digest(key)
        if there != (size, sha256):
            raise KeyTaken(
                f"{self.bucket.url.url_of(key)} already holds another object ({there[0]} bytes, sha256 "
                f"{there[1][:12]}...); it was left alone: move it away (or choose another --out) and run again"
            )
        event(log, "upload.already_there", key=key)

    # -- a multipart upload -------------------------------------------------------------

    async def _multipart(
        self, source: Source, key: str, size: int, part_bytes: int, uploads: UploadLog, transfer: Transfer
    ) -> Stored:
        record = await self._resumable(await uploads.record(), key, size, part_bytes, uploads)
        count = math.ceil(size / part_bytes)
        done = dict(record.parts) if record is not None else {}
        first = next((n for n in range(1, count + 1) if n not in done), count + 1)
        digest = _digest_after(done[first - 1].hash_state) if first > 1 else _digest_after(None)
        if digest is None:  # a state this host cannot take up (no libcrypto, another layout)
            await self.abandon(uploads)
            record, done, first, digest = None, {}, 1, _digest_after(None) or Digest()
        start = (first - 1) * part_bytes
        transfer.start_at(start)
        upload_id = record.upload_id if record is not None else None
        expected = StorageHashes()
        if first > count:  # every part is in the bucket: storage's ETag and md5 are still checked
            async with self.downloader.session.get(source.url, headers={"Range": "bytes=0-0"}) as resp:
                await storage.raise_for_status(resp, source.artifact.name)
                _check_resume(resp, 0, size, record, resp.headers.get("ETag"))
                expected = storage.storage_hashes(resp)
        else:
            headers = {"Range": f"bytes={start}-"}
            async with self.downloader.session.get(source.url, headers=headers) as resp:
                await storage.raise_for_status(resp, source.artifact.name)
                etag = resp.headers.get("ETag")
                _check_resume(resp, start, size, record, etag)
                expected = storage.storage_hashes(resp)
                if upload_id is None:
                    upload_id = await self.bucket.start_upload(key)
                    await uploads.started(
                        upload_id=upload_id, key=key, part_bytes=part_bytes, size=size, source_etag=etag
                    )
                await self._stream_parts(
                    resp, key, upload_id, first, count, part_bytes, size, digest, done, uploads, transfer
                )
        assert upload_id is not None
        _verify(source.artifact, digest, expected)
        try:
            await self.bucket.complete(key, upload_id, [(n, p.etag) for n, p in done.items()])
        except KeyTaken:
            await self.bucket.abort(key, upload_id)
            await uploads.forget()
            await self._keep_if_ours(key, digest.size, digest.sha256_hex())
        else:
            await uploads.forget()
        return self._stored(key, digest)

    async def _resumable(
        self, record: UploadRecord | None, key: str, size: int, part_bytes: int, uploads: UploadLog
    ) -> UploadRecord | None:
        """The recorded upload, if it can go on: same key, size and parts, still open in the
        bucket, and only with the parts the bucket holds under the ETags recorded."""
        if record is None:
            return None
        if (record.key, record.size, record.part_bytes) != (key, size, part_bytes):
            await self.abandon(uploads)
            return None
        held = await self.bucket.uploaded_parts(key, record.upload_id)
        if held is None:  # completed, aborted, or expired by a lifecycle rule
            await uploads.forget()
            return None
        kept = {n: p for n, p in record.parts.items() if held.get(n, ("", -1)) == (p.etag, p.length)}
        return UploadRecord(
            upload_id=record.upload_id,
            key=record.key,
            part_bytes=record.part_bytes,
            size=record.size,
            source_etag=record.source_etag,
            parts=kept,
        )

    async def _stream_parts(
        self,
        resp: aiohttp.ClientResponse,
        key: str,
        upload_id: str,
        first: int,
        count: int,
        part_bytes: int,
        size: int,
        digest: Digest | ResumableDigest,
        done: dict[int, UploadedPart],
        uploads: UploadLog,
        transfer: Transfer,
    ) -> None:
        """Parts `first`..`count` from the body, in order, hashed as they come; each uploaded
        (unless the bucket has it already) and then recorded with the digest's state after it."""
        room = anyio.Semaphore(self.parts_in_flight)  # parts held in memory while they go up
        failed: list[BaseException] = []

        async def upload(number: int, data: bytes, state: bytes) -> None:
            try:
                etag = await self.bucket.upload_part(key, upload_id, number, data)
                part = UploadedPart(number=number, etag=etag, length=len(data), hash_state=state)
                await uploads.part_done(part)  # only once the bucket has it
                done[number] = part
                crash_point("part-uploaded")
            except Exception as exc:  # the first failure stops the others, and the attempt fails with it
                failed.append(exc)
                tg.cancel_scope.cancel()
            finally:
                room.release()

        async with anyio.create_task_group() as tg:
            try:
                for number in range(first, count + 1):
                    length = min(part_bytes, size - (number - 1) * part_bytes)
                    await room.acquire()
                    data = await resp.content.readexactly(length)
                    digest.update(data)
                    transfer.add(length)
                    if number == 1 and key.endswith(".safetensors"):
                        check_safetensors_head(key.rsplit("/", 1)[-1], data, size)
                    if number in done and done[number].hash_state == digest.state():
                        # The bucket holds it (a part after a gap) with these very bytes: the same state
                        # after the same state before. Read only for the digest.
                        room.release()
                        continue
                    tg.start_soon(upload, number, data, digest.state())
            except Exception as exc:  # raised as itself below, not in an exception group
                failed.append(exc)
                tg.cancel_scope.cancel()
        if failed:
            raise failed[0]


def _digest_after(state: bytes | None) -> Digest | ResumableDigest | None:
    """The file's digest taken up after a part (`state`), or a new one (None). Without libcrypto a
    new digest cannot be saved (its state is empty) and a saved one cannot be taken up (None)."""
    if not ResumableDigest.available():
        return Digest() if state is None else None
    try:
        return ResumableDigest(state)
    except ValueError:
        return None


class Digest(Hashes):
    """`verify.Hashes` (sha256 and md5) as `ResumableDigest` is used: for a file that comes in
    one piece, or where no libcrypto lets a digest's state be saved (`state()` is then empty,
    and a resumed upload starts over)."""

    def __init__(self) -> None:
        super().__init__(md5=True, crc32c=True)

    def sha256_hex(self) -> str:
        return self.sha.hexdigest()

    def state(self) -> bytes:
        return b""


def _check_resume(
    resp: aiohttp.ClientResponse, start: int, size: int, record: UploadRecord | None, etag: str | None
) -> None:
    """The body must start where the upload goes on, from the object the upload began with."""
    if record is not None and record.source_etag and etag != record.source_etag:
        raise ObjectChanged(f"the stored object changed under the upload (ETag {record.source_etag} -> {etag})")
    if resp.status == 200:
        if start:
            raise ObjectChanged(f"storage sent the whole file when asked from byte {start}: starting the upload over")
        return
    got = storage.content_range(resp)
    if got is not None and got.total is not None and got.total != size:
        raise ObjectChanged(f"storage now has {got.total} bytes, the job says {size}")
    if got is None or got.first != start:
        shown = resp.headers.get("Content-Range")
        raise DownloadError(f"Content-Range {shown!r} does not continue the upload at byte {start} of {size}")


def _verify(artifact: Artifact, digest: Digest | ResumableDigest, expected: StorageHashes) -> None:
    """Before the object becomes visible: the job's size, storage's md5 and crc32c."""
    if artifact.size_bytes is not None and digest.size != artifact.size_bytes:
        raise VerificationFailed(f"{artifact.name}: {digest.size} bytes, the job says {artifact.size_bytes}")
    for name, theirs, ours in (
        ("md5", expected.md5, digest.md5_b64()),
        ("crc32c", expected.crc32c, digest.crc32c_b64()),
    ):
        if theirs is not None and ours != theirs:
            raise VerificationFailed(f"{artifact.name}: {name} does not match storage's x-goog-hash; fetching it again")
