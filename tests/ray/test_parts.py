"""The Ray mode's parts that need no cluster: options, the CLI flags, the ASGI hop, metrics merging."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from basemodel.errors import ConfigError
from basemodel.settings import Settings
from service.app import create_app
from service.cli import main
from service.ray.asgi import Forwarded, call_app, read_bounded
from service.ray.fleet_metrics import MetricsHub, merge
from service.ray.ingress import body_limit
from service.ray.options import RayOptions, parse_autoscale


def test_options_split_fleet_keys_from_settings(tmp_path: Path) -> None:
    given = {"replicas": "3", "autoscale": None, "home": str(tmp_path), "max_queue": 5}
    options = RayOptions.from_args(given)
    assert options.replicas == 3 and options.autoscale is None
    assert options.settings().max_queue == 5 and options.settings().home == tmp_path
    assert RayOptions.from_args(options.to_args()) == options
    assert parse_autoscale("1:4") == (1, 4)
    for bad in ("4:1", "x", "0:2"):
        with pytest.raises(ConfigError):
            parse_autoscale(bad)
    with pytest.raises(ConfigError, match="routing"):
        RayOptions.from_args({"routing": "round-robin"})
    with pytest.raises(ConfigError, match="max_queue"):
        RayOptions.from_args({"max_queue": 0})  # a bad setting fails in the driver
    with pytest.raises(ConfigError, match="replicas"):
        RayOptions.from_args({"replicas": 0})


def test_scaling_flags_need_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--replicas", "2"]) == 2
    assert "need --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["serve", "--ray", "--replicas", "2", "--autoscale", "1:2"])


def test_a_forwarded_request_gets_the_apps_own_answer(tmp_path: Path) -> None:
    app = create_app(Settings(home=tmp_path, warmup=False))

    async def run() -> list[Any]:
        health = await call_app(app, Forwarded("GET", "/healthz", b"", [], b""))
        body = b"{not json"
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        bad = await call_app(app, Forwarded("POST", "/v1/generate", b"", headers, body))
        missing = await call_app(app, Forwarded("GET", "/nope", b"", [], b""))
        return [health, bad, missing]

    health, bad, missing = asyncio.run(run())
    assert health.status == 200 and b'"ok"' in health.body
    # the model is not loaded (no lifespan here): the app's own 422 comes before readiness
    assert bad.status == 422 and b"validation_error" in bad.body
    assert missing.status == 404 and b"not_found" in missing.body


def test_the_ingress_reads_at_most_one_byte_over_the_limit() -> None:
    chunks = [b"a" * 600, b"b" * 600, b"c" * 600]

    async def run(limit: int) -> tuple[bytes, bool]:
        sent = [{"type": "http.request", "body": c, "more_body": i < 2} for i, c in enumerate(chunks)]
        messages = iter(sent)

        async def receive() -> dict[str, Any]:
            return next(messages)

        return await read_bounded(receive, limit)

    body, complete = asyncio.run(run(1000))
    assert len(body) == 1001 and not complete
    body, complete = asyncio.run(run(5000))
    assert len(body) == 1800 and complete
    settings = Settings()
    assert body_limit(settings, "POST", "/v1/generate") == settings.max_body_bytes
    assert body_limit(settings, "POST", "/v1/adapters") > settings.max_adapter_bytes


def test_fleet_metrics_carry_a_replica_label() -> None:
    text = (
        "# HELP loraswap_routing_requests_total x\n# TYPE loraswap_routing_requests_total counter\n"
        'loraswap_routing_requests_total{held="true"} 3.0\n'
    )
    hub = MetricsHub()
    hub.push("r1", text)
    hub.push("r2", text.replace("3.0", "5.0"))
    hub.push("gone", text)
    hub.forget("gone")
    families = list(text_string_to_metric_families(merge(hub.snapshot()).decode()))
    samples = {(s.labels["replica"], s.labels["held"]): s.value for f in families for s in f.samples}
    assert samples == {("r1", "true"): 3.0, ("r2", "true"): 5.0}
