"""S3 store: ``s3://bucket/prefix`` through boto3 (any S3-compatible endpoint).

The endpoint comes from ``--s3-endpoint-url`` / ``LORASWAP_S3_ENDPOINT_URL`` or boto3's own
``AWS_ENDPOINT_URL``; credentials and region from boto3's usual chain. ``put`` is a plain
``PutObject`` (atomic per object on S3). ``create`` is a conditional write,
``PutObject(IfNoneMatch="*")``: S3 answers 412 ``PreconditionFailed`` (or 409
``ConditionalRequestConflict`` while a competing write is in flight) when the key exists, so exactly
one concurrent creator wins. The store must support conditional writes (AWS S3 does since 2024-08).

Every call is bounded (``StoreTimeouts``: connect and per-socket-read timeouts, total attempts with
botocore's "standard" jittered backoff). Failures that mean the store is not answering (connection
errors, timeouts, 5xx, throttling) are ``StoreError(reason="unavailable")``, the reason a circuit
breaker counts; other S3 errors (a 403, a missing bucket) are ``reason="s3_error"``.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from adapters.errors import StoreConfigError, StoreError
from adapters.sources.base import KeyMissing, StoreTimeouts, check_key, check_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
else:
    S3Client = Any

BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
IP_LIKE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
UNAVAILABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def valid_bucket(name: str) -> bool:
    """S3's bucket naming rules: 3–63 of ``[a-z0-9.-]``, alphanumeric at both ends, no ``..``, not an IP
    address, none of the reserved prefixes and suffixes."""
    return (
        BUCKET.match(name) is not None
        and ".." not in name
        and IP_LIKE.match(name) is None
        and not name.startswith(RESERVED_BUCKET_PREFIXES)
        and not name.endswith(RESERVED_BUCKET_SUFFIXES)
    )


def client_config(timeouts: StoreTimeouts) -> Config:
    """botocore settings for bounded calls: timeouts and total attempts with standard backoff."""
    return Config(
        connect_timeout=timeouts.connect_s,
        read_timeout=timeouts.read_s,
        retries={"total_max_attempts": timeouts.attempts, "mode": "standard"},
    )


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        endpoint_url: str | None = None,
        timeouts: StoreTimeouts | None = None,
    ) -> None:
        if not valid_bucket(bucket):
            raise StoreConfigError(f"invalid S3 bucket name {bucket!r}", reason="bad_uri")
        prefix = prefix.strip("/")
        if prefix and not _valid_prefix(prefix):
            raise StoreConfigError(f"invalid S3 key prefix {prefix!r}", reason="bad_uri")
        self.bucket = bucket
        self.prefix = prefix
        self._endpoint_url = endpoint_url
        self.timeouts = timeouts or StoreTimeouts()
        self._client = client
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    @property
    def client(self) -> S3Client:
        with self._lock:  # boto3 clients are thread-safe, but creating one is not
            if self._client is None:
                config = client_config(self.timeouts)
                self._client = boto3.client("s3", endpoint_url=self._endpoint_url, config=config)
            return self._client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except ClientError as exc:
            if _code(exc) in MISSING_CODES:
                raise KeyMissing(key) from None
            raise _store_error("read", key, exc) from exc
        except (BotoCoreError, OSError) as exc:  # OSError: a socket error while reading the body
            raise _store_error("read", key, exc) from exc

    def get_range(self, key: str, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{stop - 1}"
            )
            return bytes(response["Body"].read())
        except ClientError as exc:
            if _code(exc) in MISSING_CODES:
                raise KeyMissing(key) from None
            if _code(exc) == "InvalidRange":  # start at or past the end of the object
                return b""
            raise _store_error("read", key, exc) from exc
        except (BotoCoreError, OSError) as exc:
            raise _store_error("read", key, exc) from exc

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise _store_error("write", key, exc) from exc

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if _code(exc) in CONFLICT_CODES:
                return False
            raise _store_error("create", key, exc) from exc
        except BotoCoreError as exc:
            raise _store_error("create", key, exc) from exc
        return True

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in MISSING_CODES:
                return False
            raise _store_error("stat", key, exc) from exc
        except BotoCoreError as exc:
            raise _store_error("stat", key, exc) from exc
        return True

    def modified(self, key: str) -> float:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in MISSING_CODES:
                raise KeyMissing(key) from None
            raise _store_error("stat", key, exc) from exc
        except BotoCoreError as exc:
            raise _store_error("stat", key, exc) from exc
        return float(head["LastModified"].timestamp())

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []) if "Key" in obj)
        except (ClientError, BotoCoreError) as exc:
            raise _store_error("list", prefix or "/", exc) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise _store_error("delete", key, exc) from exc


def _valid_prefix(prefix: str) -> bool:
    try:
        check_key(prefix)
    except StoreError:
        return False
    return True


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(error.get("Code", ""))
    return code if code else str(status)


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def unavailable(exc: Exception) -> bool:
    """Whether a boto error means the store did not answer properly (vs. answered with a refusal)."""
    if isinstance(exc, ClientError):
        return _status(exc) >= 500 or _code(exc) in UNAVAILABLE_CODES
    return isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError | OSError)


def _store_error(action: str, key: str, exc: Exception) -> StoreError:
    code = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
    reason = "unavailable" if unavailable(exc) else "s3_error"
    return StoreError(f"S3 {action} of {key} failed: {exc}", reason=reason, detail={"code": code})
