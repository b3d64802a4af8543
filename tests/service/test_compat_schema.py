"""``/schema`` documents the A1111 and OpenAI routes with every status they answer."""

from __future__ import annotations

from typing import Any

GENERATION = {401, 404, 409, 413, 422, 429, 503, 504}
EXPECTED = {
    ("/sdapi/v1/txt2img", "post"): GENERATION,
    ("/sdapi/v1/img2img", "post"): GENERATION,
    ("/sdapi/v1/loras", "get"): {401, 503},
    ("/sdapi/v1/sd-models", "get"): {401, 503},
    ("/sdapi/v1/samplers", "get"): {401},
    ("/sdapi/v1/schedulers", "get"): {401},
    ("/sdapi/v1/scripts", "get"): {401},
    ("/sdapi/v1/progress", "get"): {401, 422},
    ("/sdapi/v1/options", "get"): {401, 503},
    ("/sdapi/v1/options", "post"): {401, 404, 413, 422, 503},
    ("/v1/images/generations", "post"): {400, 401, 404, 409, 413, 429, 503, 504},
}


def test_schema_lists_the_compatible_routes_with_their_statuses(server: Any) -> None:
    with server.client() as http:
        schema = http.get("/schema/openapi.json").json()
    for (path, method), statuses in EXPECTED.items():
        responses = schema["paths"][path][method]["responses"]
        documented = {int(s) for s in responses if not s.startswith("2")}
        assert documented == statuses, (path, method, sorted(documented))
        body = "OpenAIErrorBody" if path.startswith("/v1/images") else "ErrorBody"
        for status in statuses:
            content = responses[str(status)]["content"]["application/json"]["schema"]
            assert content == {"$ref": f"#/components/schemas/{body}"}, (path, method, status)
    info = schema["components"]["schemas"]["OpenAIErrorInfo"]
    assert {"message", "type", "param", "code"} <= set(info["required"])
