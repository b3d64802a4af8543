"""Fetching a registration's ``s3://`` source object (JSON registrations name one instead of uploading).

Only ``s3://bucket/key`` is accepted — never http:// or file:// URLs, so a registration cannot make the
server fetch arbitrary addresses (TorchServe's ShellTorch lesson). The object's size is checked with
HeadObject before anything is downloaded, and the download itself is bounded, in bytes and in time
(the store's ``StoreTimeouts``). A URI that cannot name an S3 object (an invalid bucket name such as
``127.0.0.1:43421``, an empty or over-long key, control characters) is a 422 on ``source``, never an
attempt to reach the store.
"""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from adapters.errors import AdapterTooLarge, AdapterUnsafeFormat, StoreError
from adapters.format import PICKLE_SUFFIXES, read_limited
from adapters.sniff import SNIFF_BYTES, check_start
from adapters.sources.base import StoreTimeouts
from adapters.sources.s3 import client_config, unavailable, valid_bucket
from basemodel.errors import LoraswapError, ValidationFailed

MAX_KEY_BYTES = 1024  # S3's limit on object key length (UTF-8 bytes)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_s3_clients: dict[tuple[str | None, StoreTimeouts], Any] = {}
_s3_lock = threading.Lock()


def s3_client(endpoint_url: str | None, timeouts: StoreTimeouts | None = None) -> Any:
    """One boto3 S3 client per endpoint and bounds (``None``: boto3's own AWS_ENDPOINT_URL / default)."""
    timeouts = timeouts or StoreTimeouts()
    with _s3_lock:  # boto3 clients are thread-safe; creating them is not
        client = _s3_clients.get((endpoint_url, timeouts))
        if client is None:
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, config=client_config(timeouts)
            )
            _s3_clients[(endpoint_url, timeouts)] = client
        return client


def _bad_source(problem: str) -> ValidationFailed:
    return ValidationFailed(
        f"source must be an s3://bucket/key URI of a .safetensors file: {problem}",
        detail={"field": "source", "reason": "bad_source", "problem": problem},
        hint="Only s3:// sources are fetched; upload other files as multipart/form-data.",
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key), both checked against S3's rules; anything else is a 422.

    Other schemes are refused (no http://, no file://), and so are bucket names S3 would refuse (an
    ``host:port``, an IP address, upper case …), so no invalid URI ever reaches the store.
    """
    if not uri.startswith("s3://"):
        raise _bad_source("only the s3:// scheme is accepted")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise _bad_source("no bucket")
    if not valid_bucket(bucket):
        raise _bad_source(f"invalid bucket name {bucket!r} (S3 bucket naming rules)")
    if not key or key.endswith("/"):
        raise _bad_source("no object key (s3://bucket/key)")
    if CONTROL.search(key) or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise _bad_source(f"invalid object key (control characters or over {MAX_KEY_BYTES} bytes)")
    return bucket, key


def fetch_s3(
    uri: str, endpoint_url: str | None, max_bytes: int, *, timeouts: StoreTimeouts | None = None
) -> bytes:
    """The object's bytes, size-checked with HeadObject before anything is downloaded (blocking)."""
    bucket, key = parse_s3_uri(uri)
    if Path(key).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterUnsafeFormat(f"refusing pickle file {key}", reason="pickle")
    client = s3_client(endpoint_url, timeouts)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head["ContentLength"])
        start = b""
        if size:  # what the bytes are, before their size: one ranged read of the first bytes
            ranged = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{SNIFF_BYTES - 1}")["Body"]
            with contextlib.closing(ranged):
                start = ranged.read()
        check_start(start, size)
        if size > max_bytes:
            raise AdapterTooLarge(
                f"{uri} is {size} bytes, over the {max_bytes}-byte limit",
                reason="file_too_large",
                detail={"size": size, "limit": max_bytes},
            )
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return read_limited(body, max_bytes)
        finally:
            body.close()
    except ClientError as exc:
        raise _source_error(uri, exc) from None
    except ParamValidationError as exc:  # botocore refused the bucket or key: the client's input
        raise _bad_source(str(exc)) from None
    except (BotoCoreError, OSError) as exc:
        reason = "unavailable" if unavailable(exc) else "s3_error"
        raise StoreError(
            f"fetching {uri} failed: {exc}", reason=reason, detail={"code": type(exc).__name__}
        ) from None


def _source_error(uri: str, exc: ClientError) -> LoraswapError:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(error.get("Code") or status)
    refused = 400 <= status < 500 and status not in (408, 429)  # the store answered: not this object
    if refused or code in {"NoSuchKey", "NoSuchBucket", "NotFound", "AccessDenied", "Forbidden"}:
        return ValidationFailed(
            f"cannot read {uri}: {code}",
            detail={"field": "source", "reason": "source_unreadable", "code": code},
            hint="Check the bucket, the key and the server's S3 credentials.",
        )
    reason = "unavailable" if unavailable(exc) else "s3_error"
    return StoreError(f"fetching {uri} failed: {exc}", reason=reason, detail={"code": code})
