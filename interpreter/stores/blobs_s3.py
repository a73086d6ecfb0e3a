"""S3Blobs: the distributed blob store, aiobotocore driven through trio-asyncio (DESIGN §4).

Every call goes through ``aio_as_trio`` on the loop the client was created in, under
``trio.fail_after(config.call_timeout_s)`` on top of the client's connect/read timeouts, and every
botocore, aiohttp, socket or timeout error becomes ``StoreError`` naming only the operation and the
S3 error code (never the endpoint, the credentials or the key).

Memory stays bounded: ``put`` holds at most one part (5 MiB) plus the caller's current chunk, and
``get`` streams the body chunk by chunk. A put that fits in one part is one PutObject; a bigger one
is a multipart upload, which S3 publishes only on CompleteMultipartUpload, and which is aborted on
any error, on ``max_bytes`` overflow and on cancellation, so no half-written object is ever visible.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import trio
import trio_asyncio
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from interpreter.settings import Settings
from interpreter.stores.protocols import BlobInfo, BlobNotFound, BlobTooLarge, StoreError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PART_SIZE = 5 * MIB  # S3's minimum: memory per upload in flight is a few parts
MIN_PART_SIZE = 5 * MIB  # S3's floor for every part but the last
READ_CHUNK = 256 * 1024
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 60.0  # one whole call (a 5 MiB part included), retries included
CLEANUP_S = 5.0
MAX_KEY_BYTES = 1024
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
US_EAST_1 = "us-east-1"


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str
    bucket: str
    region: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    call_timeout_s: float = CALL_TIMEOUT_S
    part_size: int = PART_SIZE
    list_page_size: int = 1000  # S3's own maximum
    max_pool_connections: int = 20

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise ValueError("part_size is below S3's 5 MiB minimum")

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Config:
        scheme = "https" if settings.s3_secure else "http"
        return cls(
            endpoint_url=f"{scheme}://{settings.s3_endpoint}",
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
        )


class S3StoreError(StoreError):
    """A StoreError that keeps S3's error code (``"unknown"`` for transport errors and timeouts)."""

    def __init__(self, message: str, code: str = "unknown") -> None:
        super().__init__(message)
        self.code = code


class _NotFound(S3StoreError):
    """The key (or the bucket) is not there. Callers that expect that catch it; to others it is a StoreError."""


def check_key(key: str) -> None:
    """Refuse what DirBlobs refuses too (empty, ``.`` or ``..`` components, NUL), so keys work on both."""
    parts = key.split("/")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES or any(
        part in ("", ".", "..") or "\0" in part for part in parts
    ):
        raise StoreError("invalid blob key")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or "unknown"


class S3Blobs:
    """The Blobs protocol on one S3 bucket. Build it with ``open_s3_blobs``."""

    backend = "s3"

    def __init__(self, client: Any, loop: Any, config: S3Config) -> None:
        self._client = client
        self._loop = loop
        self._config = config
        self._bucket = config.bucket
        self._closed = False

    async def _call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StoreError(f"s3: {op}: the store is closed")
        try:
            with trio.fail_after(self._config.call_timeout_s):
                return await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args, **kwargs)
        except trio.TooSlowError:
            raise S3StoreError(f"s3: {op} timed out") from None
        except ClientError as exc:
            code = _error_code(exc)
            if code in NOT_FOUND_CODES:
                raise _NotFound(f"s3: {op}: not found", code) from None
            raise S3StoreError(f"s3: {op} failed ({code})", code) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            # Their messages name the endpoint; only the class is kept. OSError covers TimeoutError.
            raise S3StoreError(f"s3: {op} failed ({type(exc).__name__})") from exc

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> int:
        check_key(key)
        part_size = self._config.part_size
        buffer = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        completed = False
        try:
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise BlobTooLarge("the blob is larger than allowed")
                buffer += chunk
                # Strictly more than one part buffered: the stream does not fit in a single PutObject.
                while len(buffer) > part_size:
                    if upload_id is None:
                        created = await self._call(
                            "put", self._client.create_multipart_upload, Bucket=self._bucket, Key=key
                        )
                        upload_id = str(created["UploadId"])
                    parts.append(await self._upload_part(key, upload_id, len(parts) + 1, _take(buffer, part_size)))
            if upload_id is None:
                await self._call("put", self._client.put_object, Bucket=self._bucket, Key=key, Body=bytes(buffer))
            else:
                parts.append(await self._upload_part(key, upload_id, len(parts) + 1, _take(buffer, len(buffer))))
                await self._call(
                    "put",
                    self._client.complete_multipart_upload,
                    Bucket=self._bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            completed = True
            return size
        finally:
            if upload_id is not None and not completed:
                # The parts are invisible until completion, but they hold storage until aborted.
                with trio.move_on_after(CLEANUP_S, shield=True):
                    await self._abort(key, upload_id)

    async def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        response = await self._call(
            "put",
            self._client.upload_part,
            Bucket=self._bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._call(
                "abort", self._client.abort_multipart_upload, Bucket=self._bucket, Key=key, UploadId=upload_id
            )
        except StoreError as exc:
            # The bucket's lifecycle rule for incomplete uploads (if any) is the backstop.
            log.warning("s3: aborting a multipart upload failed", extra={"fields": {"error": str(exc)}})

    async def get(self, key: str) -> AsyncGenerator[bytes, None]:
        check_key(key)
        try:
            response = await self._call("get", self._client.get_object, Bucket=self._bucket, Key=key)
        except _NotFound:
            raise BlobNotFound("no such blob") from None
        body = response["Body"]
        try:
            while chunk := await self._call("get", body.read, READ_CHUNK):
                yield bytes(chunk)
        finally:
            # Synchronous: releases (or, before the end, drops) the pooled connection; no await needed,
            # so it also runs when the generator is finalised late.
            body.close()

    async def head(self, key: str) -> BlobInfo | None:
        check_key(key)
        try:
            response = await self._call("head", self._client.head_object, Bucket=self._bucket, Key=key)
        except _NotFound:
            return None
        return BlobInfo(key, int(response["ContentLength"]), response["LastModified"].timestamp())

    async def delete(self, key: str) -> bool:
        # S3's DeleteObject does not say whether the key existed, hence the HEAD first (two nodes
        # deleting the same key at once may both see True).
        if await self.head(key) is None:
            return False
        await self._call("delete", self._client.delete_object, Bucket=self._bucket, Key=key)
        return True

    async def list(self, prefix: str) -> list[BlobInfo]:
        found: list[BlobInfo] = []
        request: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix, "MaxKeys": self._config.list_page_size}
        while True:
            page = await self._call("list", self._client.list_objects_v2, **request)
            found.extend(
                BlobInfo(str(item["Key"]), int(item["Size"]), item["LastModified"].timestamp())
                for item in page.get("Contents", [])
            )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(found, key=lambda blob: blob.key)
            request["ContinuationToken"] = token

    async def ping(self) -> None:
        await self._call("ping", self._client.head_bucket, Bucket=self._bucket)

    async def aclose(self) -> None:
        """Close the client's HTTP session; idempotent. Every later call raises StoreError."""
        if self._closed:
            return
        self._closed = True
        try:
            with trio.fail_after(CLEANUP_S):
                await trio_asyncio.aio_as_trio(self._client.close, loop=self._loop)()
        except (trio.TooSlowError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise StoreError(f"s3: close failed ({type(exc).__name__})") from exc

    async def ensure_bucket(self) -> None:
        """Create the bucket when it is missing, with a LocationConstraint unless the region is us-east-1."""
        try:
            await self.ping()
            return
        except _NotFound:
            pass
        request: dict[str, Any] = {"Bucket": self._bucket}
        if self._config.region != US_EAST_1:
            # us-east-1 refuses a LocationConstraint naming itself; every other region requires one.
            request["CreateBucketConfiguration"] = {"LocationConstraint": self._config.region}
        try:
            await self._call("create_bucket", self._client.create_bucket, **request)
        except S3StoreError as exc:
            # Another node may have created it since the HEAD (some servers answer BucketAlreadyExists
            # even to its owner); the second HEAD tells whether it is ours to use.
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            await self.ping()
            return
        log.info("s3: bucket created", extra={"fields": {"region": self._config.region}})


def _take(buffer: bytearray, count: int) -> bytes:
    """The first ``count`` bytes of ``buffer``, removed from it (one copy, no intermediate slice)."""
    with memoryview(buffer) as view:
        data = view[:count].tobytes()
    del buffer[:count]
    return data


def _client_config(config: S3Config) -> Any:
    return AioConfig(
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        # One retry for a dropped connection or a 5xx; the call timeout bounds the whole call anyway.
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=config.max_pool_connections,
        # Path-style URLs: S3-compatible servers (Garage, MinIO, moto) on host:port have no bucket DNS.
        s3={"addressing_style": "path"},
        # Checksums only where S3 requires them: not every S3-compatible server accepts the CRC
        # headers and trailers that newer botocore sends by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Load botocore's JSON models in a thread, not on the event loop.
        warm_up_loader_caches=True,
    )


@asynccontextmanager
async def open_s3_blobs(config: S3Config) -> AsyncIterator[S3Blobs]:
    """An S3Blobs whose client lives in the running trio-asyncio loop; closed when the block ends.

    The caller holds ``trio_asyncio.open_loop()`` around this block. The bucket is created when it
    is missing (DESIGN §4), so an S3 that is down or refuses the credentials stops the start.

    Raises:
        StoreError: S3 does not answer in time, refuses the credentials, or the bucket cannot be created.
        RuntimeError: no trio-asyncio loop is running.
    """
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("open_s3_blobs needs trio_asyncio.open_loop() around it")
    creator = get_session().create_client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
        config=_client_config(config),
    )
    try:
        with trio.fail_after(config.call_timeout_s):
            # Entered inside the loop: the HTTP session binds to it.
            client = await trio_asyncio.aio_as_trio(creator.__aenter__, loop=loop)()
    except trio.TooSlowError:
        raise StoreError("s3: creating the client timed out") from None
    except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
        raise StoreError(f"s3: creating the client failed ({type(exc).__name__})") from exc
    store = S3Blobs(client, loop, config)
    try:
        await store.ensure_bucket()
        yield store
    finally:
        with trio.move_on_after(CLEANUP_S, shield=True):
            try:
                await store.aclose()
            except StoreError as exc:
                log.warning("s3: closing the client failed", extra={"fields": {"error": str(exc)}})
