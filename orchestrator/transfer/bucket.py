"""The bucket that `--out s3://bucket/prefix` names: every request to it, through
aiobotocore, with its errors translated here (`BucketError`, `KeyTaken`).

Credentials and region come from the standard AWS chain (environment, profile, instance
role); the endpoint from `--s3-endpoint-url`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
(botocore reads them). New objects are written with `If-None-Match: *`, so an object
already at a key is never overwritten; only the small files a run rewrites (`job.json`,
`SHA256SUMS`, `summary.json`, `report.html`) are put plainly.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..errors import BucketError, KeyTaken

SCHEME = "s3://"
READ_CHUNK_BYTES = 1024 * 1024
ATTEMPTS = 5  # botocore's own retries of a request (its standard mode: 5xx, throttling, resets)
PROBE_NAME = ".dreamlook-batch-write-check"
DENIED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"})
MISSING = frozenset({"404", "NoSuchBucket"})


@dataclass(frozen=True, slots=True)
class BucketUrl:
    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, url: str) -> BucketUrl:
        if not url.startswith(SCHEME):
            raise ValueError(f"{url!r} is not an s3:// URL")
        bucket, _, prefix = url[len(SCHEME) :].partition("/")
        if not bucket or "?" in url or "#" in url:
            raise ValueError(f"{url!r}: write it as s3://BUCKET/PREFIX/")
        prefix = prefix.strip("/")
        return cls(bucket, prefix + "/" if prefix else "")

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def url(self, *parts: str) -> str:
        """The URL of `parts` under the prefix."""
        return self.url_of(self.key(*parts))

    def url_of(self, key: str) -> str:
        """The URL of a whole key (one that already holds the prefix)."""
        return f"{SCHEME}{self.bucket}/{key}"

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"


def is_bucket_url(out: str | None) -> bool:
    return out is not None and out.startswith(SCHEME)


def _code(exc: BaseException | None) -> str:
    """botocore's error code of a ClientError ("404", "NoSuchKey"...); "" for anything else."""
    response: Mapping[str, Any] = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _cause_code(exc: BaseException) -> str:
    return _code(exc.__cause__)


class Bucket:
    """One client for the run (`async with`); its methods name keys relative to the prefix."""

    def __init__(self, url: BucketUrl, *, endpoint_url: str | None = None) -> None:
        self.url = url
        self._endpoint_url = endpoint_url
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None  # aiobotocore's S3 client (untyped)

    async def __aenter__(self) -> Bucket:
        try:
            from aiobotocore.session import get_session
            from botocore.config import Config
        except ImportError as exc:
            raise BucketError("writing to a bucket needs aiobotocore: pip install 'dreamlook-batch[s3]'") from exc
        config = Config(retries={"mode": "standard", "total_max_attempts": ATTEMPTS})
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", endpoint_url=self._endpoint_url, config=config)
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    @property
    def client(self) -> Any:
        assert self._client is not None, "use Bucket in `async with`"
        return self._client

    @contextlib.asynccontextmanager
    async def _translated(self, what: str, key: str = "") -> AsyncIterator[None]:
        """botocore's errors as ours, naming the bucket and key (never a credential)."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.url.url_of(key) if key else str(self.url)
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code == "PreconditionFailed":
                raise KeyTaken(f"{where}: an object is already there") from exc
            if code in DENIED:
                raise BucketError(
                    f"{where}: access denied ({code}) while trying to {what}; check the AWS credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and that they may write there"
                ) from exc
            if code in MISSING and not key:
                raise BucketError(f"{where}: no such bucket ({code}); create it or fix the name") from exc
            if code == "NoSuchBucket":
                raise BucketError(f"{where}: no such bucket; create it or fix the name") from exc
            raise BucketError(f"{where}: could not {what} ({code or type(exc).__name__})") from exc
        except BotoCoreError as exc:
            raise BucketError(f"{where}: could not {what} ({type(exc).__name__}: {exc})") from exc

    # -- before anything is paid for --------------------------------------------------

    async def check_writable(self) -> None:
        """The bucket answers and these credentials may do all a run does under the prefix: write,
        read back and delete an object; start, list and abort a multipart upload."""
        async with self._translated("reach the bucket"):
            await self.client.head_bucket(Bucket=self.url.bucket)
        probe = self.url.key(f"{PROBE_NAME}-{uuid.uuid4().hex[:8]}")
        async with self._translated("write a test object", probe):
            await self.client.put_object(Bucket=self.url.bucket, Key=probe, Body=b"", IfNoneMatch="*")
        try:
            await self.read_digest(probe)
            upload_id = await self.start_upload(probe)
            try:
                if await self.uploaded_parts(probe, upload_id) is None:
                    raise BucketError(f"{self.url.url_of(probe)}: a multipart upload just started is not listed")
            finally:
                await self.abort(probe, upload_id)
        finally:
            async with self._translated("delete the test object", probe):
                await self.client.delete_object(Bucket=self.url.bucket, Key=probe)

    # -- whole objects ----------------------------------------------------------------

    async def put_new(self, key: str, data: bytes, *, md5_b64: str | None = None) -> None:
        """Create `key` with `data`; KeyTaken if an object is already there (never overwritten).
        With `md5_b64`, the bucket checks the bytes it received against it."""
        extra = {"ContentMD5": md5_b64} if md5_b64 else {}
        async with self._translated("write", key):
            await self.client.put_object(Bucket=self.url.bucket, Key=key, Body=data, IfNoneMatch="*", **extra)

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Write `key`, replacing what is there (the files a run rewrites: job.json, SHA256SUMS...)."""
        async with self._translated("write", key):
            await self.client.put_object(Bucket=self.url.bucket, Key=key, Body=data, ContentType=content_type)

    async def size_of(self, key: str) -> int | None:
        """The size of the object at `key`; None if there is none."""
        try:
            async with self._translated("look at", key):
                head = await self.client.head_object(Bucket=self.url.bucket, Key=key)
        except BucketError as exc:
            if _cause_code(exc) in {"404", "NoSuchKey"}:
                return None
            raise
        return int(head["ContentLength"])

    async def read_digest(self, key: str) -> tuple[int, str]:
        """(size, sha256) of the object at `key`, read back in chunks."""
        import hashlib

        sha = hashlib.sha256()
        size = 0
        async with self._translated("read", key):
            got = await self.client.get_object(Bucket=self.url.bucket, Key=key)
            async with got["Body"] as body:
                async for chunk in body.iter_chunks(READ_CHUNK_BYTES):
                    sha.update(chunk)
                    size += len(chunk)
        return size, sha.hexdigest()

    # -- multipart uploads -----------------------------------------------------------

    async def start_upload(self, key: str) -> str:
        async with self._translated("start an upload to", key):
            got = await self.client.create_multipart_upload(Bucket=self.url.bucket, Key=key)
        return str(got["UploadId"])

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """One part; its ETag (what completing the upload names it by)."""
        async with self._translated(f"upload part {number} to", key):
            got = await self.client.upload_part(
                Bucket=self.url.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
        return str(got["ETag"])

    async def uploaded_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
        """The parts the bucket holds for this upload, by number: (ETag, size); None if the
        upload is gone (completed, aborted, or expired by a lifecycle rule)."""
        parts: dict[int, tuple[str, int]] = {}
        try:
            async with self._translated("list the parts of", key):
                paginator = self.client.get_paginator("list_parts")
                async for page in paginator.paginate(Bucket=self.url.bucket, Key=key, UploadId=upload_id):
                    for part in page.get("Parts", []):
                        parts[int(part["PartNumber"])] = (str(part["ETag"]), int(part["Size"]))
        except BucketError as exc:
            if _cause_code(exc) == "NoSuchUpload":
                return None
            raise
        return parts

    async def complete(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> None:
        """Make the object visible, only if no object is at `key` yet (KeyTaken otherwise: the
        upload stays open, for the caller to abort)."""
        body = {"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in sorted(parts)]}
        async with self._translated("complete the upload to", key):
            await self.client.complete_multipart_upload(
                Bucket=self.url.bucket, Key=key, UploadId=upload_id, MultipartUpload=body, IfNoneMatch="*"
            )

    async def abort(self, key: str, upload_id: str) -> None:
        """Drop an upload and its parts (no orphaned parts billed); one already gone is fine."""
        try:
            async with self._translated("abort the upload to", key):
                await self.client.abort_multipart_upload(Bucket=self.url.bucket, Key=key, UploadId=upload_id)
        except BucketError as exc:
            if _cause_code(exc) != "NoSuchUpload":
                raise
