"""Cohort files on S3 (``s3://bucket/key``), read once and checked as local files are.

The check pass (sources.py) streams each object with one GET: its header is parsed, its bytes
hashed (the provenance sha256 is of exactly the bytes read), its non-finite values counted, and
its data block copied into a spool file in a private temporary folder beside the output. The
write pass reads the spool copy, verified by its identity stamp as a local file is, so the
values written are the bytes that were hashed: an object replaced after its check cannot reach
the HDF5. A stream that breaks is resumed from where it stopped with ``If-Match`` on the ETag,
so an object changed while being read is an error (65), never a mix of two versions. Memory:
each of the ``--s3-workers`` threads holds one block of its object at a time.

NIfTI maps, their subject masks and MRtrix fixel data (``fetched``) are copied whole, by the same
streamed GET, into a spool file that the local reader then reads (hashing the bytes, as it does a
local file's) and that is deleted at once: their masked values go to the check pass's ``Spill``.

Credentials are boto3's standard chain (environment, shared files, SSO, instance role);
``MODELARRAYIO_S3_ANON=1`` sends unsigned requests, as ModelArrayIO does, for public buckets
(fcp-indi); ``AWS_ENDPOINT_URL`` (read by boto3) points at any S3-compatible store. Connection
errors, throttling and 5xx answers are retried by botocore's standard mode (exponential backoff
with jitter, ``AWS_MAX_ATTEMPTS`` attempts, default 5). Errors are one line: no such bucket or
key 66, access denied or no credentials 77, endpoint unreachable 69 (naming the endpoint).

boto3 is imported only when a cohort names an s3:// source: it costs ~0.3 s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from greyarray.errors import (
    DataError,
    MissingInputError,
    NoPermissionError,
    UnavailableError,
    UsageError,
)
from greyarray.io import inputs
from greyarray.io.fileio import output_failure, private_folder

SCHEME = "s3://"
OBJECT = r"s3://[^/]+/.*[^/]$"  # a bucket and a key that is not a "folder"
ANON = "MODELARRAYIO_S3_ANON"
DEFAULT_ATTEMPTS = 5
DEFAULT_WORKERS = 8
PIECE = 2**20  # bytes taken from a stream per read call
DENIED = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "403",
}


def is_url(value: object) -> bool:
    """An S3 object URL (a cohort's ``s3://bucket/key`` string, or a parsed one)."""
    return isinstance(value, S3Url) or (isinstance(value, str) and value.startswith(SCHEME))


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/key``: where a cohort's source file is. Never a local path: it is not
    resolved against the CSV's folder, and it has no ``__fspath__``."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, text: str) -> S3Url:
        bucket, _, key = text[len(SCHEME) :].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise UsageError(f"{text!r}: not an S3 object (expected s3://bucket/key)")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def resolve(self) -> S3Url:
        """Provenance records the URL as written (as it does a local file's resolved path)."""
        return self


@dataclass(frozen=True)
class Spooled:
    """Where the write pass reads an object's data: the copy made while it was checked."""

    path: Path  # the spool file: the object's data block only
    base: int  # offset of the data block in the object
    stamp: inputs.FileStamp

    def read(self, url: S3Url, offset: int, size: int) -> bytes:
        return inputs.read_checked(self.path, self.stamp, offset - self.base, size)


def attempts() -> int:
    """Attempts per request, the first included (AWS_MAX_ATTEMPTS, as the AWS CLI reads it)."""
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_ATTEMPTS)))
    except ValueError:
        return DEFAULT_ATTEMPTS


def _anonymous() -> bool:
    return os.environ.get(ANON, "").lower() in ("1", "true", "yes")


_CLIENTS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def client(workers: int = DEFAULT_WORKERS):
    """One boto3 S3 client per configuration (clients are thread-safe; the environment is read
    each time, so a changed one gets a new client)."""
    anonymous = _anonymous()
    key = (anonymous, attempts(), workers, tuple(sorted(os.environ.items())))
    with _LOCK:
        if key not in _CLIENTS:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            for name in ("boto3", "botocore", "urllib3"):  # their INFO lines are noise here
                logging.getLogger(name).setLevel(logging.WARNING)
            config = Config(
                retries={"mode": "standard", "total_max_attempts": attempts()},
                max_pool_connections=max(10, workers),
                connect_timeout=10,
                read_timeout=60,
                **({"signature_version": UNSIGNED} if anonymous else {}),
            )
            _CLIENTS.clear()
            _CLIENTS[key] = boto3.session.Session().client("s3", config=config)
        return _CLIENTS[key]


@contextlib.contextmanager
def opened(url: S3Url, spool: Path | None, workers: int) -> Iterator[RemoteObject]:
    """An object streamed by one GET, for sources.inspect: ``read``, ``keep`` (into a new file
    of ``spool``), ``done``."""
    s3 = client(workers)
    handle, name = tempfile.mkstemp(dir=spool, suffix=".data") if spool else (None, None)
    kept = os.fdopen(handle, "wb") if handle is not None else None
    try:
        response = request(s3, url, lambda: s3.get_object(Bucket=url.bucket, Key=url.key))
    except BaseException:
        if kept is not None:
            kept.close()
            with contextlib.suppress(OSError):
                os.unlink(name)
        raise
    remote = RemoteObject(s3, url, response, kept, Path(name) if name else None)
    try:
        yield remote
    finally:
        remote.close()


@contextlib.contextmanager
def fetched(url: S3Url, spool: Path | None, workers: int) -> Iterator[Spooled]:
    """The whole object, copied by one GET (streamed a piece at a time, resumed as ``opened``
    resumes) into a new file of ``spool``, for a reader of local files (NIfTI, MRtrix); the
    copy is deleted after the block. Memory: one piece."""
    spool = spool or Path(tempfile.gettempdir())
    remote = None
    try:
        with opened(url, spool, workers) as remote:
            for start in range(0, remote.size, PIECE):
                remote.keep(remote.read(start, min(PIECE, remote.size - start)))
            copy = remote.done(0)
        yield copy
    finally:
        if remote is not None:
            with contextlib.suppress(OSError):
                remote._spool_path.unlink()


def read_file(url: S3Url):
    """The parsed header of an object (export-results' template: the cohort's first file)."""
    from greyarray.io.formats import cifti

    with opened(url, None, 1) as remote:
        return cifti.parse(url, cifti.read_head(remote.read, url, remote.size), remote.size)


class RemoteObject:
    """``read(offset, size)`` moves forward through the stream (it may go back to the start
    of the previous read: the header is read twice); ``keep`` copies data into the spool."""

    def __init__(self, s3, url: S3Url, response: dict, spool, spool_path: Path):
        self.s3, self.url, self.size = s3, url, int(response["ContentLength"])
        self.etag = response.get("ETag")
        self._body, self._spool, self._spool_path = response["Body"], spool, spool_path
        self._buffer, self._start, self._position = bytearray(), 0, 0

    def read(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` (``offset`` >= the previous read's). The buffer
        holds the object's bytes [_start, _position)."""
        if offset < self._start:
            raise ValueError(f"{self.url}: read at {offset}, before {self._start}")
        self._drop(min(offset, self._position))
        while self._position < offset + size:
            piece = self._next(min(PIECE, offset + size - self._position))
            if not piece:
                raise DataError(
                    f"{self.url}: object is truncated (ends at byte {self._position}, its "
                    f"header needs {offset + size})"
                )
            self._buffer += piece
            self._position += len(piece)
        self._drop(offset)
        return bytes(self._buffer[:size])

    def _drop(self, before: int) -> None:
        """Forget the bytes before ``before`` (memory: at most one read's worth is kept)."""
        del self._buffer[: before - self._start]
        self._start = before

    def keep(self, raw: bytes) -> None:
        try:
            self._spool.write(raw)
        except OSError as err:
            raise output_failure(self._spool_path, err) or err from None

    def done(self, data_offset: int) -> Spooled:
        self._spool.close()
        return Spooled(
            self._spool_path, data_offset, inputs.FileStamp.of(os.stat(self._spool_path))
        )

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
        with contextlib.suppress(Exception):
            self._body.close()

    def _next(self, size: int) -> bytes:
        """The next bytes of the stream; a broken stream is resumed where it stopped, from the
        same object (If-Match), after a pause that doubles each time."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        for attempt in range(attempts()):
            try:
                return self._body.read(size)
            except (BotoCoreError, HTTPError, OSError) as err:
                if attempt + 1 == attempts():
                    raise unavailable(self.s3, self.url, err) from None
                time.sleep(min(20.0, 0.1 * 2**attempt))
                with contextlib.suppress(Exception):
                    self._body.close()
                same = {"IfMatch": self.etag} if self.etag else {}
                response = request(
                    self.s3,
                    self.url,
                    lambda: self.s3.get_object(
                        Bucket=self.url.bucket,
                        Key=self.url.key,
                        Range=f"bytes={self._position}-",
                        **same,  # noqa: B023 (called at once)
                    ),
                )
                self._body = response["Body"]
        raise AssertionError("unreachable")


def request(s3, url: S3Url, call):
    """``call()`` (a boto3 request, retried by botocore), with its errors as one line each."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    try:
        return call()
    except ClientError as err:
        raise refused(s3, url, err) from None
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise NoPermissionError(
            f"{url}: no AWS credentials ({err}); boto3 looks in AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials and the instance's role; "
            f"for a public bucket set {ANON}=1"
        ) from None
    except BotoCoreError as err:
        raise unavailable(s3, url, err) from None


def refused(s3, url: S3Url, err) -> Exception:
    """The error for an answer of the S3 service (after botocore's retries of 5xx)."""
    code = str(err.response.get("Error", {}).get("Code", ""))
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    message = err.response.get("Error", {}).get("Message") or code
    if code == "NoSuchBucket":
        return MissingInputError(f"{url}: no such bucket {url.bucket!r}")
    if code in ("NoSuchKey", "404", "NotFound"):
        return MissingInputError(f"{url}: no such key in bucket {url.bucket!r}")
    if code in DENIED or status == 403:
        unsigned = f"; requests are unsigned as {ANON} is set" if _anonymous() else ""
        return NoPermissionError(f"{url}: access denied ({code}: {message}){unsigned}")
    if code == "PreconditionFailed" or status == 412:
        return DataError(
            f"{url}: object changed while it was being read (its ETag is no longer "
            "the one checked); run again when the inputs are stable"
        )
    if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
        return UnavailableError(
            f"{endpoint(s3)}: S3 endpoint answered {status} {code} after {attempts()} "
            f"attempts (reading {url})"
        )
    return MissingInputError(f"{url}: cannot read ({code}: {message})")


def unavailable(s3, url: S3Url, err: Exception) -> UnavailableError:
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return UnavailableError(
        f"{endpoint(s3)}: S3 endpoint unreachable after {attempts()} attempts ({reason}); "
        f"reading {url}"
    )


def endpoint(s3) -> str:
    return getattr(getattr(s3, "meta", None), "endpoint_url", None) or "S3"


@contextlib.contextmanager
def spool_folder(near: Path, needed: bool) -> Iterator[Path | None]:
    """A private temporary folder for the objects' data, in the output's folder (or its nearest
    existing parent: nothing is created before the checks pass); removed at the end."""
    if not needed:
        yield None
        return
    folder = Path(near).absolute()
    while not folder.is_dir():
        folder = folder.parent
    with private_folder(folder) as spool:
        yield spool
