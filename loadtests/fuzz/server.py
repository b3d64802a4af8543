"""A real loraswap server on loopback for the API fuzzer, with moto's S3 server beside it.

``fuzz_target`` starts, in this process: moto's ``ThreadedMotoServer`` on 127.0.0.1 (dummy credentials,
``S3_SOURCE``, a valid adapter),
and uvicorn serving ``create_app`` on a free loopback port with admin and generate tokens, a local
store with the adapter ``watercolor`` (the schema's example id) registered, and generation made cheap
(tiny-sd, at most 2 steps, 32x32, 2 images). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from adapters.identity import BaseIdentity
from adapters.registry import Registry
from basemodel.loader import BaseModel
from basemodel.settings import Settings
from loadtests.fuzz.seeds import kohya_seed, serialise
from loadtests.loopback import LOOPBACK, listening_socket, port_of, uvicorn_in_thread
from service.app import create_app

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
GENERATE_TOKEN = "fuzz-generate-token-0123456789"
FIXTURE_ADAPTERS = ("watercolor", "a", "0")  # the schema's example id and the ids Hypothesis tries first
S3_BUCKET, S3_KEY = "fuzz-adapters", "valid.safetensors"
S3_SOURCE = f"s3://{S3_BUCKET}/{S3_KEY}"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CHEAP = {"max_steps": 2, "max_width": 32, "max_height": 32, "max_images": 2, "request_timeout_s": 60.0}


@dataclass
class FuzzTarget:
    url: str
    settings: Settings
    base: BaseIdentity
    registry: Registry
    adapter_file: bytes

    @property
    def schema_url(self) -> str:
        return f"{self.url}/schema/openapi.json"

    def restore_fixtures(self) -> None:
        """Register the fixture adapters again where a fuzzed DELETE removed them."""
        for adapter_id in FIXTURE_ADAPTERS:
            if self.registry.latest_version(adapter_id) is None:
                self.registry.register(self.adapter_file, adapter_id, {"title": f"fuzz fixture {adapter_id}"})


@contextmanager
def aws_env() -> Iterator[None]:
    """Dummy AWS credentials for boto3 (moto accepts any), restored afterwards."""
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_PROFILE"]}
    os.environ.update(AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def moto_s3(adapter_file: bytes) -> Iterator[str]:
    """moto's S3 server on loopback with ``s3://b/k`` holding ``adapter_file``; yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket=S3_BUCKET)
        client.put_object(Bucket=S3_BUCKET, Key=S3_KEY, Body=adapter_file)
        yield url
    finally:
        server.stop()


@contextmanager
def uvicorn_thread(app: Any, sock: socket.socket, timeout_s: float = 120) -> Iterator[str]:
    """Serve ``app`` on ``sock`` (``loadtests.loopback.listening_socket``) in a thread until the block
    ends; yields the base URL."""
    server, thread = uvicorn_in_thread(app, sock, name="fuzz-uvicorn", lifespan="auto")
    url = f"http://{LOOPBACK}:{port_of(sock)}"
    try:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=url, timeout=30) as http:
            while True:
                if server.started and http.get("/readyz").status_code == 200:
                    break
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("the fuzz target server never became ready")
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


@contextmanager
def fuzz_target(base: BaseModel, home: Path, **overrides: Any) -> Iterator[FuzzTarget]:
    """Everything the API fuzzer talks to, torn down afterwards."""
    identity = BaseIdentity.from_base_model(base)
    seed = kohya_seed(identity, torch.float32)
    adapter_file = serialise(seed.tensors, seed.metadata)
    with aws_env(), moto_s3(adapter_file) as s3_url:
        sock = listening_socket()
        port = port_of(sock)
        settings = Settings(
            **{
                "home": home,
                "port": port,
                "warmup": False,
                "admin_tokens": [ADMIN_TOKEN],
                "generate_tokens": [GENERATE_TOKEN],
                "s3_endpoint_url": s3_url,
                **CHEAP,
                **overrides,
            }
        )
        target = FuzzTarget("", settings, identity, Registry.from_settings(settings, identity), adapter_file)
        target.restore_fixtures()
        with uvicorn_thread(create_app(settings, loader=lambda _: base), sock) as url:
            target.url = url
            yield target
