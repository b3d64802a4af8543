"""Fixtures for the adapters suite: a real peft LoRA on tiny-sd, and a store of each backend."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import LocalStore, Store
from loadtests.moto import moto_s3
from tests.adapters.factory import LoraCase, make_case

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def base_identity(base_model: Any) -> BaseIdentity:
    return BaseIdentity.from_base_model(base_model)


@pytest.fixture(scope="session")
def lora_case(base_model: Any) -> LoraCase:
    return make_case(base_model.pipe)


def save_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, reached through real boto3 with dummy credentials
    (PutObject serialised like S3's conditional writes: ``loadtests/moto.py``)."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    import boto3

    name = f"loraswap-test-{next(_bucket_ids)}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same tests run against both backends."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    from adapters.sources.s3 import S3Store

    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "team/adapters", endpoint_url=endpoint)


@pytest.fixture
def registry(store: Store, base_identity: BaseIdentity) -> Registry:
    return Registry(store, base_identity, max_rank=64)
