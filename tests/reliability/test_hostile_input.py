"""Hostile input gets a typed 4xx, never a 500 (issue 12, defects 3-6 and 8, strict types, kohya alpha).

Real uvicorn servers over loopback (``tests/service/conftest.py``), the real registry on a local store, and
the CLI through its root command.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.errors import AdapterInvalid, AdapterTooLarge
from adapters.format import DEFAULT_LIMITS, Limits, read_adapter
from adapters.identity import BaseIdentity
from adapters.metadata import parse_header_metadata
from adapters.normalise import normalise
from adapters.registry import Registry
from adapters.sources import LocalStore
from basemodel.errors import ValidationFailed
from service.cli import main
from service.lora.request import extract_prompt_adapters
from tests.adapters.conftest import base_identity, lora_case, save_bytes  # noqa: F401 (fixtures)
from tests.adapters.factory import LoraCase, diffusers_layout, kohya_layout
from tests.service.conftest import RunningServer, start_server  # noqa: F401 (fixtures)

DEEP = 5000
JSON_HEADERS = {"content-type": "application/json"}


def safetensors_with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


def header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


def internal_errors(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('loraswap_errors_total{type="internal_error"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def upload(http: httpx.Client, data: bytes, adapter_id: str, **fields: str) -> httpx.Response:
    files = {"file": ("style.safetensors", data, "application/octet-stream")}
    return http.post("/v1/adapters", files=files, data={"id": adapter_id, **fields})


def stored_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file()] if store.exists() else []


@pytest.fixture(scope="module")
def adapter_bytes(lora_case: LoraCase) -> bytes:
    return save_bytes(diffusers_layout(lora_case))


@pytest.fixture
def store_server(start_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    return start_server(store=str(tmp_path / "store"))


@pytest.fixture
def cli_env(loraswap_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"file://{tmp_path / 'store'}")
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["adapters", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- 3. deeply nested JSON -----------------------------------------------------------------------------


def test_depth_scan_ignores_brackets_in_strings_and_stops_recursion() -> None:
    from basemodel.errors import JSONTooDeep
    from basemodel.jsonlimits import MAX_JSON_DEPTH, json_depth, loads

    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth('["\\"]]]]", "\\\\", [[]]]') == 3
    assert json_depth(b'"unterminated [[[') == 0
    assert loads(nested(MAX_JSON_DEPTH)) is not None
    for hostile in (nested(MAX_JSON_DEPTH + 1), b"[" * 100_000, nested(100_000), b'{"a":' * 100_000):
        with pytest.raises(JSONTooDeep):
            loads(hostile)
    with pytest.raises(ValidationFailed, match="NaN"):
        loads(b'{"x": NaN}')


def _depth_by_hand(text: bytes) -> tuple[int, bool]:
    """Nesting as a JSON tokenizer reads it, char by char; stops (False) at a backslash outside a
    string, where every parser stops."""
    depth = best = 0
    inside = escaped = False
    for ch in text.decode("latin-1"):
        if inside:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                inside = False
        elif ch == "\\":
            return best, False
        elif ch == '"':
            inside = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best, True


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(st.binary(max_size=40).map(lambda b: bytes(b'[]{}"\\a,:'[x % 9] for x in b)))
def test_depth_scan_equals_a_tokenizer_on_quotes_and_escapes(text: bytes) -> None:
    """The bytes-level scan (escapes dropped, then the text between quotes) is exact wherever a
    parser reads on, and never below what a parser reads before it fails."""
    from basemodel.jsonlimits import json_depth

    want, clean = _depth_by_hand(text)
    got = max(json_depth(text), 0)
    assert got == want if clean else got >= want


def test_deep_safetensors_header_is_refused_before_any_parser(adapter_bytes: bytes) -> None:
    with pytest.raises(AdapterInvalid) as err:
        read_adapter(safetensors_with_header(nested(100_000, b"")))
    assert err.value.reason == "json_too_deep"
    deep_metadata = json.dumps({"__metadata__": {"loraswap": nested(DEEP).decode()}}).encode()
    with pytest.raises(AdapterInvalid) as err:  # the header is shallow; its 'loraswap' entry is not
        parse_header_metadata(json.loads(deep_metadata)["__metadata__"])
    assert err.value.reason == "json_too_deep"


def test_cli_register_of_a_deep_header_is_a_user_error(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = cli_env / "deep.safetensors"
    path.write_bytes(safetensors_with_header(nested(100_000, b"")))
    code, _, err = cli(capsys, "register", str(path), "--id", "deep")
    assert code == 2
    assert "error[adapter_invalid]" in err and "nested" in err and "Traceback" not in err


def test_deep_json_anywhere_is_422(store_server: RunningServer, adapter_bytes: bytes) -> None:
    deep_header = safetensors_with_header(nested(100_000, b""))
    with store_server.client() as http:
        assert upload(http, adapter_bytes, "style").status_code == 201
        responses = {
            "upload": upload(http, deep_header, "deep"),
            "generate": http.post(
                "/v1/generate",
                content=b'{"prompt": "x", "adapters": ' + nested(DEEP, b"") + b"}",
                headers=JSON_HEADERS,
            ),
            "register_json": http.post(
                "/v1/adapters",
                content=b'{"id": "x", "source": "s3://b/k.safetensors", "metadata": '
                + b'{"a": ' * DEEP
                + b"1"
                + b"}" * DEEP
                + b"}",
                headers=JSON_HEADERS,
            ),
            "preload": http.post(
                "/v1/adapters/style/preload",
                content=b'{"version": ' + nested(DEEP) + b"}",
                headers=JSON_HEADERS,
            ),
            "form_metadata": upload(
                http, adapter_bytes, "meta", metadata=json.dumps({"training": {"x": json.loads(nested(100))}})
            ),
        }
        for name, response in responses.items():
            assert response.status_code == 422, (name, response.text)
            assert error_of(response)["type"] in {"json_too_deep", "adapter_invalid"}, name
            assert "nested" in error_of(response)["message"], name
        brackets_in_a_string = http.post("/v1/generate", json={"prompt": "[" * 3000, "steps": 1})
        assert brackets_in_a_string.status_code == 200, brackets_in_a_string.text
        assert [a["adapter_id"] for a in http.get("/v1/adapters").json()["adapters"]] == ["style"]
        assert internal_errors(http) == 0


# -- 4. nothing stored that its readers would refuse ---------------------------------------------------


def test_metadata_over_its_limit_is_413_and_nothing_is_stored(
    store_server: RunningServer, adapter_bytes: bytes
) -> None:
    store = Path(store_server.settings.store or "")
    with store_server.client() as http:
        response = upload(http, adapter_bytes, "big", metadata=json.dumps({"title": "t" * 600_000}))
        assert response.status_code == 413, response.text
        assert error_of(response)["detail"]["reason"] == "metadata_too_large"
        assert http.get("/v1/adapters/big").status_code == 404
    assert stored_files(store) == []


def test_a_stored_header_over_the_readers_cap_is_refused_before_it_is_visible(
    start_server: Callable[..., RunningServer], adapter_bytes: bytes, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    cap = header_length(adapter_bytes) + 64  # the upload fits; the stored file, with metadata, does not
    server = start_server(store=str(store), max_adapter_header_bytes=cap)
    with server.client() as http:
        response = upload(http, adapter_bytes, "style", metadata=json.dumps({"title": "a title"}))
        assert response.status_code == 413, response.text
        error = error_of(response)
        assert error["type"] == "adapter_too_large" and error["detail"]["reason"] == "header_too_large"
        assert "as it would be stored" in error["message"]
        assert http.get("/v1/adapters").json() == {"adapters": []}
    assert stored_files(store) == []


def test_registry_checks_the_bytes_it_stores(
    base_identity: BaseIdentity, adapter_bytes: bytes, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    limits = Limits(max_bytes=DEFAULT_LIMITS.max_bytes, max_header_bytes=header_length(adapter_bytes) + 64)
    registry = Registry(store, base_identity, limits=limits)
    with pytest.raises(AdapterTooLarge) as err:
        registry.register(adapter_bytes, "style", {"title": "a title"})
    assert err.value.reason == "header_too_large"
    assert registry.list() == [] and stored_files(tmp_path / "store") == []


def test_show_of_an_unreadable_stored_header_is_not_a_500(
    start_server: Callable[..., RunningServer],
    base_identity: BaseIdentity,
    adapter_bytes: bytes,
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    Registry(LocalStore(store), base_identity).register(adapter_bytes, "old", {"title": "t" * 4000})
    server = start_server(store=str(store), max_adapter_header_bytes=header_length(adapter_bytes) + 64)
    with server.client() as http:  # e.g. stored before the check, or the cap was lowered since
        response = http.get("/v1/adapters/old/versions/1")
        assert response.status_code == 200, response.text
        assert response.json()["metadata"] is None
        assert response.json()["metadata_error"]["type"] == "adapter_corrupt"
        assert internal_errors(http) == 0


# -- 5. scale_default ----------------------------------------------------------------------------------

BAD_SCALES = ["1e308", "100", "-5", "4.0001", "nan", "inf", "-inf"]


def test_scale_default_is_bounded_over_http(store_server: RunningServer, adapter_bytes: bytes) -> None:
    with store_server.client() as http:
        for value in BAD_SCALES:
            response = upload(http, adapter_bytes, "style", scale_default=value)
            assert response.status_code == 422, (value, response.text)
            assert error_of(response)["detail"]["field"] == "scale_default", value
        from_metadata = upload(http, adapter_bytes, "style", metadata='{"scale_default": 100}')
        assert from_metadata.status_code == 422, from_metadata.text
        for raw in (b"NaN", b"Infinity", b"100", b"-4.5"):
            response = http.post(
                "/v1/adapters",
                content=b'{"id": "style", "source": "s3://b/k.safetensors", "scale_default": ' + raw + b"}",
                headers=JSON_HEADERS,
            )
            assert response.status_code == 422, (raw, response.text)
        assert http.get("/v1/adapters").json() == {"adapters": []}
        for edge in ("-4", "4"):
            ok = upload(http, adapter_bytes, f"edge{edge}", scale_default=edge)
            assert ok.status_code == 201, ok.text
            assert ok.json()["scale_default"] == float(edge)


def test_scale_default_is_bounded_in_the_registry_and_the_cli(
    base_identity: BaseIdentity,
    adapter_bytes: bytes,
    tmp_path: Path,
    cli_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = Registry(LocalStore(tmp_path / "registry"), base_identity)
    for value in (100.0, -5.0, 1e308, math.nan, math.inf, -math.inf):
        with pytest.raises(ValidationFailed):
            registry.register(adapter_bytes, "style", scale_default=value)
    with pytest.raises(AdapterInvalid):
        registry.register(adapter_bytes, "style", {"scale_default": math.nan})
    assert registry.list() == []
    path = cli_env / "style.safetensors"
    path.write_bytes(adapter_bytes)
    for value in ("100", "nan", "inf"):
        code, _, err = cli(capsys, "register", str(path), "--id", "style", "--scale-default", value)
        assert code == 2 and "error[validation_error]" in err and "scale_default" in err, (value, err)


# -- 6. prompt tags go through the same validation -----------------------------------------------------


def test_prompt_tag_weights_are_validated_like_adapter_scales() -> None:
    for weight in ("nan", "99", "inf", "-inf", "1e400", "-4.5", "1_0"):
        with pytest.raises(ValidationFailed) as err:
            extract_prompt_adapters(f"a fox <lora:style:{weight}>")
        assert err.value.detail["field"] == "prompt", weight
    for tag in ("<lora:style@0>", "<lora:style@01>", "<lora:style@-1>", "<lora:../x>", "<lora:style@\u0663>"):
        with pytest.raises(ValidationFailed):
            extract_prompt_adapters(f"a fox {tag}")
    prompt, found = extract_prompt_adapters("a fox <lora:Style@3:-4> <lora:other:4> <lora:x@latest>")
    assert prompt == "a fox"
    assert [(a.adapter_id, a.version, a.scale) for a in found] == [
        ("style", 3, -4.0),
        ("other", None, 4.0),
        ("x", None, None),
    ]


def test_prompt_tags_cannot_bypass_the_scale_limit(store_server: RunningServer, adapter_bytes: bytes) -> None:
    with store_server.client() as http:
        assert upload(http, adapter_bytes, "style").status_code == 201
        for weight in ("nan", "99", "inf"):
            response = http.post("/v1/generate", json={"prompt": f"a fox <lora:style:{weight}>", "steps": 1})
            assert response.status_code == 422, (weight, response.text)
            assert error_of(response)["detail"]["field"] == "prompt"
        ok = http.post("/v1/generate", json={"prompt": "a fox <lora:style:4>", "steps": 1})
        assert ok.status_code == 200, ok.text
        assert ok.json()["adapters"][0]["scale"] == 4.0


# -- strict types --------------------------------------------------------------------------------------


def with_adapter(**spec: Any) -> dict[str, Any]:
    return {"prompt": "x", "adapters": [{"id": "style", **spec}]}


def test_numbers_and_booleans_are_not_coerced(store_server: RunningServer, adapter_bytes: bytes) -> None:
    with store_server.client() as http:
        assert upload(http, adapter_bytes, "style").status_code == 201
        refused = {
            "steps str": ("/v1/generate", {"prompt": "x", "steps": "1"}, "steps"),
            "steps bool": ("/v1/generate", {"prompt": "x", "steps": True}, "steps"),
            "seed float": ("/v1/generate", {"prompt": "x", "seed": 1.0}, "seed"),
            "width float": ("/v1/generate", {"prompt": "x", "width": 32.0}, "width"),
            "num_images bool": ("/v1/generate", {"prompt": "x", "num_images": True}, "num_images"),
            "guidance str": ("/v1/generate", {"prompt": "x", "guidance_scale": "7"}, "guidance_scale"),
            "scale str": ("/v1/generate", with_adapter(scale="1"), "adapters.0.scale"),
            "version float": ("/v1/generate", with_adapter(version=1.0), "adapters.0.version"),
            "preload version": ("/v1/adapters/style/preload", {"version": "1"}, "version"),
            "preload pin": ("/v1/adapters/style/preload", {"pin": 1}, "pin"),
            "register scale": (
                "/v1/adapters",
                {"id": "x", "source": "s3://b/k.safetensors", "scale_default": "1"},
                "scale_default",
            ),
        }
        for name, (path, body, field) in refused.items():
            response = http.post(path, json=body)
            assert response.status_code == 422, (name, response.text)
            assert [e["field"] for e in error_of(response)["detail"]["errors"]] == [field], name
        ints_for_floats = http.post(
            "/v1/generate",
            json={"prompt": "x", "steps": 1, "guidance_scale": 7, "adapters": [{"id": "style", "scale": 1}]},
        )
        assert ints_for_floats.status_code == 200, ints_for_floats.text


# -- kohya alpha ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-4.0, 0.0, 3e38])
def test_kohya_alpha_out_of_range_is_refused_naming_the_key(
    lora_case: LoraCase, base_identity: BaseIdentity, alpha: float
) -> None:
    tensors = kohya_layout(lora_case)
    key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    tensors[key] = torch.tensor(alpha)
    with pytest.raises(AdapterInvalid) as err:
        normalise(tensors, base_identity.architecture)
    assert err.value.reason == "bad_alpha"
    assert err.value.detail["keys"] == [key]


def test_kohya_alpha_up_to_the_documented_multiple_of_rank_is_accepted(
    lora_case: LoraCase, base_identity: BaseIdentity
) -> None:
    from adapters.validate import MAX_ALPHA_RATIO

    tensors = kohya_layout(lora_case)
    key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    rank = tensors[key.replace(".alpha", ".lora_down.weight")].shape[0]
    tensors[key] = torch.tensor(float(MAX_ALPHA_RATIO * rank))
    _, info = normalise(tensors, base_identity.architecture)
    assert max(info.alphas.values()) == MAX_ALPHA_RATIO * rank
    tensors[key] = torch.tensor(float(MAX_ALPHA_RATIO * rank) * 1.01)
    with pytest.raises(AdapterInvalid):
        normalise(tensors, base_identity.architecture)


def test_an_embedded_alpha_is_bounded_too(
    base_identity: BaseIdentity, adapter_bytes: bytes, tmp_path: Path
) -> None:

    tensors, _ = read_adapter(adapter_bytes)
    registry = Registry(LocalStore(tmp_path / "store"), base_identity)
    for alpha in (-4.0, 3e38):
        hostile = save_bytes(tensors, {"loraswap": json.dumps({"alpha": alpha})})
        with pytest.raises(AdapterInvalid) as err:
            registry.register(hostile, "style")
        assert err.value.reason == "bad_alpha"
    assert registry.list() == []


def test_kohya_training_values_that_are_not_finite_are_dropped(
    lora_case: LoraCase, base_identity: BaseIdentity, tmp_path: Path
) -> None:
    header = {"ss_learning_rate": "nan", "ss_steps": "100", "ss_training_started_at": "1e400"}
    data = save_bytes(kohya_layout(lora_case), header)
    registry = Registry(LocalStore(tmp_path / "store"), base_identity)
    version = registry.register(data, "style")
    training = registry.read_metadata(version).training
    assert training is not None and training.steps == 100
    assert training.learning_rate is None and training.started_at is None


# -- ids, paths, queries -------------------------------------------------------------------------------


def test_hostile_ids_paths_and_queries_are_4xx(store_server: RunningServer, adapter_bytes: bytes) -> None:
    store = Path(store_server.settings.store or "")
    with store_server.client() as http:
        newline_id = upload(http, adapter_bytes, "style\n")
        assert newline_id.status_code == 422, newline_id.text
        assert error_of(newline_id)["type"] == "adapter_ref_invalid"
        assert stored_files(store) == []
        assert upload(http, adapter_bytes, "style").status_code == 201
        for path in (
            "/v1/adapters?include_deleted=maybe",
            "/v1/adapters/%C3%9Ftyle",
            "/v1/adapters/style%0A",
            "/v1/adapters/style/versions/99999999999999999999999",
            "/v1/adapters/style/versions/0",
        ):
            response = http.get(path)
            assert response.status_code == 422, (path, response.text)
        huge = http.post("/v1/adapters/style/preload?version=99999999999999999999")
        assert huge.status_code == 422 and error_of(huge)["detail"]["field"] == "version", huge.text
        assert internal_errors(http) == 0


# -- 8. the OpenAPI document lists every status with the error body ------------------------------------

SHOW = {401, 404, 422, 503}
EXPECTED_STATUSES = {
    ("/v1/generate", "post"): {401, 404, 409, 413, 422, 429, 500, 503, 504},
    ("/v1/adapters", "get"): {401, 422, 503},
    ("/v1/adapters", "post"): {401, 403, 409, 413, 422, 503},
    ("/v1/adapters/{adapter_id}", "get"): SHOW,
    ("/v1/adapters/{adapter_id}/versions/{version}", "get"): SHOW,
    ("/v1/adapters/{adapter_id}", "delete"): {401, 403, 404, 422, 503},
    ("/v1/adapters/{adapter_id}/versions/{version}", "delete"): {401, 403, 404, 422, 503},
    ("/v1/adapters/{adapter_id}/preload", "post"): {401, 403, 404, 409, 413, 422, 500, 503},
    ("/v1/jobs", "post"): {401, 404, 409, 413, 422, 429, 500, 503},
    ("/v1/jobs/{job_id}", "get"): {401, 404},
    ("/v1/jobs/{job_id}/events", "get"): {401, 404},
    ("/v1/jobs/{job_id}", "delete"): {401, 404, 409},
}


def test_openapi_documents_every_error_status_with_the_error_body(store_server: RunningServer) -> None:
    with store_server.client() as http:
        schema = http.get("/schema/openapi.json").json()
    components = schema["components"]["schemas"]
    for (path, method), statuses in EXPECTED_STATUSES.items():
        responses = schema["paths"][path][method]["responses"]
        documented = {int(s) for s in responses if not s.startswith("2")}
        assert documented == statuses, (path, method, sorted(documented))
        for status in statuses:
            content = responses[str(status)]["content"]["application/json"]["schema"]
            assert content == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
    error_body = components["ErrorBody"]
    assert error_body["required"] == ["error"]
    info = components[error_body["properties"]["error"]["$ref"].rsplit("/", 1)[1]]
    assert set(info["required"]) == {"type", "message", "detail"}
    answers_400 = sorted(
        f"{method} {path}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "400" in operation.get("responses", {})
    )
    assert answers_400 == ["post /v1/images/generations"]  # 422 everywhere but OpenAI's route (its SDK)
