"""Object stores the cache reads from: S3 (and S3-compatible endpoints) and local directories.

An ``ObjectStore`` does I/O only, like an httpx transport: ``list`` turns a table's location into
``ObjectRef`` values (each pinned to one version by its ETag), ``download`` writes exactly that
version to a file, ``upload`` publishes a query's written file whole or not at all (S3: one PUT,
or a multipart upload that is aborted on failure; local: a temporary name, then a rename).
Policy (where files live, single flight, budget, integrity, who may write where) is the caller's.

This is the only module that imports boto3. The SDK is blocking, so each call runs in a worker
thread; a download checks a stop flag between chunks so a cancelled caller gets its thread back
promptly and never leaves a half-written file behind. botocore exceptions become
``ObjectStoreError`` here, with the endpoint, the bucket and what to check.

Credentials are handed in by the caller (resolved from named secrets on the worker); with none the
client signs nothing. Either way boto3's credential chain (environment, ``~/.aws``, instance
metadata) is never consulted, and the region defaults to us-east-1 rather than to the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config

from ..errors import ObjectStoreError

T = TypeVar("T")

CHUNK = 1024 * 1024
# Files above this go up as a multipart upload in parts of this size (S3's minimum is 5 MiB).
MULTIPART_THRESHOLD = 8 * 1024 * 1024
LOCAL_SOURCE = "local"
_DEFAULT_REGION = "us-east-1"  # an explicit default: boto3 would otherwise read the environment
# botocore error codes, grouped by what the operator has to fix.
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_BUCKET_CODES = {"NoSuchBucket", "InvalidBucketName"}
_CHANGED_CODES = {"PreconditionFailed", "412"}
_MISSING_CODES = {"NoSuchKey", "404"}


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One version of one object: what the cache keys an entry by (with ``source``)."""

    source: str  # identifies the store, e.g. "s3:http://127.0.0.1:9000" or "local"
    bucket: str  # S3 bucket, or "" for local
    key: str  # S3 key, or absolute local path
    etag: str  # S3 ETag without quotes; local: f"{size}-{mtime_ns}"
    size: int


class ObjectStore(Protocol):
    """Lists and fetches objects; raises ``ObjectStoreError`` and nothing foreign."""

    source: str

    async def list(self, url: str) -> list[ObjectRef]:
        """Every object under ``url``, sorted by key, directory markers skipped."""
        ...

    async def download(self, ref: ObjectRef, dest: Path) -> None:
        """Write exactly the version ``ref`` names to ``dest``, or raise and leave no ``dest``."""
        ...

    async def upload(self, source: Path, url: str) -> None:
        """Publish the file ``source`` at ``url`` whole, or raise and leave nothing there."""
        ...


async def run_stoppable(fn: Callable[[threading.Event], T]) -> T:
    """Run ``fn(stop)`` in a thread; on cancellation set ``stop`` and wait for the thread.

    Waiting matters: the caller removes the destination file once we return, which would race
    with a thread still writing to it.
    """
    stop = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(fn, stop))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await task
        raise


def _read_all(source: BinaryIO, key: str) -> Iterator[bytes]:
    """A local file's bytes; a read error is the source's (``ObjectStoreError``), not the
    cache disk's (an ``OSError`` from writing the copy)."""
    while True:
        try:
            chunk = source.read(CHUNK)
        except OSError as error:
            raise _read_error(key, error) from None
        if not chunk:
            return
        yield chunk


def _read_error(key: str, error: OSError) -> ObjectStoreError:
    return ObjectStoreError(
        f"cannot read local file {key!r} ({error.strerror}); check the disk or share it is "
        "on, then run the query again"
    )


def write_chunks(
    chunks: Iterable[bytes], dest: Path, size: int, stop: threading.Event, *, what: str = ""
) -> None:
    """Write ``chunks`` (the object ``what``) to a new file ``dest``, checking the total.

    On any failure (including ``stop``) the file is removed before the error propagates.
    """
    written = 0
    try:
        with open(dest, "xb") as out:
            for chunk in chunks:
                if stop.is_set():
                    raise ObjectStoreError("download cancelled")
                out.write(chunk)
                written += len(chunk)
        if written != size:
            raise ObjectStoreError(
                f"{what or dest.name}: received {written} bytes, the listing said {size}; "
                "the object changed or the connection broke, retry the query"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


class S3Store:
    """S3 or an S3-compatible endpoint (MinIO, moto, R2...), through one boto3 client.

    The client is built once and is thread-safe; ``max_pool_connections`` bounds how many
    requests (downloads in flight) it keeps open at a time. ``list_page_size`` is the keys per
    ListObjectsV2 request (S3's maximum, 1000, unless a test wants to see pagination); uploads
    larger than ``multipart_threshold`` go up in parts of that size.
    """

    def __init__(
        self,
        *,
        endpoint_url: str | None,
        region: str | None,
        path_style: bool,
        access_key_id: str | None,
        secret_access_key: str | None,
        session_token: str | None = None,
        max_pool_connections: int = 16,
        list_page_size: int = 1000,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        if (access_key_id is None) != (secret_access_key is None):
            raise ObjectStoreError(
                "S3 credentials need both an access key id and a secret access key; "
                "set both in the connection (or neither for a public bucket)"
            )
        self.endpoint = endpoint_url or "AWS S3"
        self._page_size = list_page_size
        self.source = f"s3:{endpoint_url}" if endpoint_url else f"s3:aws:{region or ''}"
        config = Config(
            region_name=region or _DEFAULT_REGION,
            s3={"addressing_style": "path" if path_style else "auto"},
            max_pool_connections=max_pool_connections,
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            signature_version=None if access_key_id else UNSIGNED,
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
            region_name=region or _DEFAULT_REGION,
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_threshold,
            max_concurrency=4,
        )

    async def list(self, url: str) -> list[ObjectRef]:
        bucket, prefix = parse_s3_url(url)
        return await run_stoppable(lambda stop: self._list(bucket, prefix, stop))

    def _list(self, bucket: str, prefix: str, stop: threading.Event) -> list[ObjectRef]:
        # "s3://b/trips" means the object "trips" or the objects under "trips/", not "trips2/".
        exact = prefix and not prefix.endswith("/")
        refs: list[ObjectRef] = []
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self._page_size}
        )
        with self._translated("list", bucket, prefix):
            for page in pages:
                if stop.is_set():
                    raise ObjectStoreError("listing cancelled")
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.endswith("/") or (exact and key != prefix and key[len(prefix)] != "/"):
                        continue
                    refs.append(ObjectRef(self.source, bucket, key, _etag(item), item["Size"]))
        return sorted(refs, key=lambda ref: ref.key)

    async def download(self, ref: ObjectRef, dest: Path) -> None:
        await run_stoppable(lambda stop: self._download(ref, dest, stop))

    def _download(self, ref: ObjectRef, dest: Path, stop: threading.Event) -> None:
        with self._translated("download", ref.bucket, ref.key):
            # If-Match: an object overwritten since the listing fails with 412 instead of
            # mixing two versions of a table in one query.
            response = self._client.get_object(
                Bucket=ref.bucket, Key=ref.key, IfMatch=f'"{ref.etag}"'
            )
            body = response["Body"]
            try:
                write_chunks(body.iter_chunks(CHUNK), dest, ref.size, stop, what=ref.key)
            finally:
                body.close()

    async def upload(self, source: Path, url: str) -> None:
        bucket, key = parse_s3_url(url)
        await run_stoppable(lambda stop: self._upload(source, bucket, key, stop))

    def _upload(self, source: Path, bucket: str, key: str, stop: threading.Event) -> None:
        def progress(_sent: int) -> None:
            if stop.is_set():  # raising here fails the transfer, which aborts a multipart
                raise ObjectStoreError("upload cancelled")

        # A PUT below the threshold, else a multipart upload; s3transfer aborts a multipart
        # upload that fails, so a failed upload leaves no object and no parts. A cancel is seen
        # only between progress callbacks: one that lands after the last part (or after a
        # single PUT's body went) may still leave the object written.
        with self._translated("upload", bucket, key):
            try:
                self._client.upload_file(
                    str(source), bucket, key, Config=self._transfer, Callback=progress
                )
            except boto3.exceptions.S3UploadFailedError as error:  # wraps a ClientError's text
                raise ObjectStoreError(
                    f"S3 upload at {self.endpoint}, bucket {bucket!r}, key {key!r} failed "
                    f"({error}); nothing was written, check the key may write there and retry"
                ) from None

    @contextlib.contextmanager
    def _translated(self, what: str, bucket: str, key: str) -> Iterator[None]:
        """botocore errors become one-line ObjectStoreErrors naming endpoint, bucket, the fix."""
        where = f"S3 {what} at {self.endpoint}, bucket {bucket!r}"
        try:
            yield
        except botocore.exceptions.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            raise ObjectStoreError(f"{where}: {_client_error_help(code, key, error)}") from None
        except botocore.exceptions.NoCredentialsError:
            raise ObjectStoreError(
                f"{where}: no credentials; set the connection's access_key_id and secret_access_key"
            ) from None
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionError,
        ) as error:
            raise ObjectStoreError(
                f"{where}: cannot connect ({error}); check the endpoint URL and that the "
                "server is reachable from this worker"
            ) from None
        except botocore.exceptions.BotoCoreError as error:
            raise ObjectStoreError(f"{where}: {error}; check the connection settings") from None


def _client_error_help(code: str, key: str, error: Exception) -> str:
    if code in _AUTH_CODES:
        return (
            f"access refused ({code}); check the connection's access key, secret and region, "
            "and that the key may read this bucket"
        )
    if code in _BUCKET_CODES:
        return f"no such bucket ({code}); check the bucket name in the table's path"
    if code in _CHANGED_CODES:
        return f"object {key!r} changed since it was listed; run the query again"
    if code in _MISSING_CODES:
        return f"object {key!r} is gone (deleted since it was listed?); run the query again"
    return f"{code or 'error'} ({error}); check the endpoint and the bucket"


def _etag(item: dict[str, object]) -> str:
    return str(item.get("ETag", "")).strip('"')


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` to (bucket, prefix); anything else is an ObjectStoreError."""
    if not url.startswith("s3://"):
        raise ObjectStoreError(f"{url!r} is not an s3:// URL; write it as s3://bucket/prefix/")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ObjectStoreError(f"{url!r} names no bucket; write it as s3://bucket/prefix/")
    return bucket, prefix


class LocalStore:
    """Files in a local directory (the embedded default's sample data, tests).

    A file's version is its size and mtime: ``download`` refuses a file that changed since
    ``list``. Keys are resolved absolute paths; symlinks under the listed directory and hidden
    files (names starting with ".") are skipped.
    """

    source = LOCAL_SOURCE

    async def list(self, url: str) -> list[ObjectRef]:
        return await run_stoppable(lambda stop: self._list(Path(url)))

    def _list(self, path: Path) -> list[ObjectRef]:
        if not path.is_absolute():
            raise ObjectStoreError(f"local path {str(path)!r} is not absolute; give a full path")
        path = path.resolve()  # the configured path may be a link; links inside it are skipped
        if path.is_file():
            return [self._ref(path)]
        if not path.is_dir():
            raise ObjectStoreError(
                f"local path {str(path)!r} is not a file or directory; check the table's path"
            )
        refs = []
        for directory, dirnames, filenames in os.walk(path):
            dirnames[:] = [name for name in dirnames if not name.startswith(".")]
            for name in filenames:
                file = Path(directory, name)
                if not name.startswith(".") and file.is_file() and not file.is_symlink():
                    refs.append(self._ref(file))
        return sorted(refs, key=lambda ref: ref.key)

    def _ref(self, path: Path) -> ObjectRef:
        info = path.stat(follow_symlinks=False)
        etag = f"{info.st_size}-{info.st_mtime_ns}"
        return ObjectRef(LOCAL_SOURCE, "", str(path), etag, info.st_size)

    async def download(self, ref: ObjectRef, dest: Path) -> None:
        await run_stoppable(lambda stop: self._download(ref, dest, stop))

    def _download(self, ref: ObjectRef, dest: Path, stop: threading.Event) -> None:
        try:
            fd = os.open(ref.key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise ObjectStoreError(
                f"cannot read local file {ref.key!r} ({error.strerror}); run the query again "
                "if it was replaced, else check the path and its permissions"
            ) from None
        try:
            source = os.fdopen(fd, "rb")  # refuses a directory (EISDIR)
        except OSError as error:
            os.close(fd)
            raise _read_error(ref.key, error) from None
        with source:
            info = os.fstat(source.fileno())
            if f"{info.st_size}-{info.st_mtime_ns}" != ref.etag:
                raise ObjectStoreError(
                    f"local file {ref.key!r} changed since it was listed; run the query again"
                )
            write_chunks(_read_all(source, ref.key), dest, ref.size, stop, what=ref.key)

    async def upload(self, source: Path, url: str) -> None:
        await run_stoppable(lambda stop: self._upload(source, Path(url), stop))

    def _upload(self, source: Path, dest: Path, stop: threading.Event) -> None:
        """Copy to a hidden temporary name beside ``dest``, then rename: readers (and ``list``,
        which skips hidden files) never see a half-written file."""
        if not dest.is_absolute():
            raise ObjectStoreError(f"local path {str(dest)!r} is not absolute; give a full path")
        temp = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            temp.unlink(missing_ok=True)  # left by a crash: write_chunks creates a new file
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as data:
                chunks = iter(lambda: data.read(CHUNK), b"")
                write_chunks(chunks, temp, source.stat().st_size, stop, what=str(source))
            os.replace(temp, dest)
        except OSError as error:
            temp.unlink(missing_ok=True)
            raise ObjectStoreError(
                f"cannot write local file {str(dest)!r} ({error.strerror}); check the directory "
                "exists and the worker may write to it"
            ) from None
