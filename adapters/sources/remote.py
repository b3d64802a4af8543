"""Fetching a registration's ``s3://`` source object (JSON registrations name one instead of uploading).

Only ``s3://bucket/key`` is accepted — never http:// or file:// URLs, so a registration cannot make the
server fetch arbitrary addresses (TorchServe's ShellTorch lesson). The object's size is checked with
HeadObject before anything is downloaded, and the download itself is bounded.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters.errors import AdapterTooLarge, AdapterUnsafeFormat, StoreError
from adapters.format import PICKLE_SUFFIXES, read_limited
from basemodel.errors import LoraswapError, ValidationFailed

S3_CONFIG = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})

_s3_clients: dict[str | None, Any] = {}
_s3_lock = threading.Lock()


def s3_client(endpoint_url: str | None) -> Any:
    """One boto3 S3 client per endpoint (``None``: boto3's own AWS_ENDPOINT_URL / default)."""
    with _s3_lock:  # boto3 clients are thread-safe; creating them is not
        client = _s3_clients.get(endpoint_url)
        if client is None:
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=S3_CONFIG)
            _s3_clients[endpoint_url] = client
        return client


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key). Any other scheme is refused (no http://, no file://)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key or key.endswith("/"):
        raise ValidationFailed(
            "source must be an s3://bucket/key URI of a .safetensors file",
            detail={"field": "source", "reason": "bad_source"},
            hint="Only s3:// sources are fetched; upload other files as multipart/form-data.",
        )
    return bucket, key


def fetch_s3(uri: str, endpoint_url: str | None, max_bytes: int) -> bytes:
    """The object's bytes, size-checked with HeadObject before anything is downloaded (blocking)."""
    bucket, key = parse_s3_uri(uri)
    if Path(key).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterUnsafeFormat(f"refusing pickle file {key}", reason="pickle")
    client = s3_client(endpoint_url)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head["ContentLength"])
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
    except BotoCoreError as exc:
        raise StoreError(
            f"fetching {uri} failed: {exc}", reason="s3_error", detail={"code": type(exc).__name__}
        ) from None


def _source_error(uri: str, exc: ClientError) -> LoraswapError:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(error.get("Code") or status)
    if status in (403, 404) or code in {"NoSuchKey", "NoSuchBucket", "NotFound", "AccessDenied", "Forbidden"}:
        return ValidationFailed(
            f"cannot read {uri}: {code}",
            detail={"field": "source", "reason": "source_unreadable", "code": code},
            hint="Check the bucket, the key and the server's S3 credentials.",
        )
    return StoreError(f"fetching {uri} failed: {exc}", reason="s3_error", detail={"code": code})
