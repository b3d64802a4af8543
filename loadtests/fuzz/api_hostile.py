"""Fixed hostile requests the API fuzzer sends besides schemathesis' generated ones.

schemathesis generates what the schema describes; these are what it does not: JSON nested thousands
deep, A1111 ``<lora:id:w>`` tags with NaN/inf/99, numbers sent as strings or booleans (strict types),
``s3://`` sources whose bucket is not a bucket name, hostile ``scale_default`` and oversized metadata,
lone surrogates, hostile ``init_image`` / ``mask_image`` files (``hostile_images.py``: bombs, garbage,
truncated, other formats, masks of another size; awkward modes that are converted), and every known
adapter-file reproducer (``reproducers.py``) uploaded as ``multipart/form-data``. Each step says
which status it must get; the fuzzer's checks apply as well.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import torch

from adapters.identity import BaseIdentity
from loadtests.fuzz.draft import Case
from loadtests.fuzz.hostile_images import image_cases as hostile_image_cases
from loadtests.fuzz.reproducers import reproducer_cases
from loadtests.fuzz.seeds import kohya_seed, serialise
from loadtests.fuzz.server import S3_SOURCE as SOURCE

GENERATE = "POST /v1/generate"
REGISTER = "POST /v1/adapters"
SHOW_VERSION = "GET /v1/adapters/{adapter_id}/versions/{version}"
PRELOAD = "POST /v1/adapters/{adapter_id}/preload"
JSON_HEADERS = {"Content-Type": "application/json"}
DEPTH = 5_000


def shown(status: int) -> bool:
    """A version is shown (200), or it does not exist because its registration was refused (404)."""
    return status in (200, 404)


def is_4xx(status: int) -> bool:
    return 400 <= status < 500


def not_5xx(status: int) -> bool:
    return status < 500


@dataclass(frozen=True)
class Step:
    operation: str  # 'METHOD /path/{param}' as the schema names it
    request: dict[str, Any]  # requests.request keyword arguments: data / json / files / params
    path_parameters: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    expect: Callable[[int], bool] = is_4xx
    expect_text: str = "4xx"

    def url(self) -> str:
        path = self.operation.split(" ", 1)[1]
        return path.format(**{k: quote(str(v), safe="") for k, v in self.path_parameters.items()})

    def describe(self) -> str:
        shown = {k: (v if len(repr(v)) < 200 else f"<{len(repr(v))} chars>") for k, v in self.request.items()}
        return f"{self.operation.split(' ', 1)[0]} {self.url()} {shown}"


@dataclass(frozen=True)
class Hostile:
    label: str
    steps: tuple[Step, ...]


def raw_json(operation: str, text: str, **kwargs: Any) -> Step:
    return Step(operation, {"data": text.encode()}, headers=JSON_HEADERS, **kwargs)


def status(code: int) -> dict[str, Any]:
    return {"expect": lambda s: s == code, "expect_text": str(code)}


def deep_cases() -> list[Hostile]:
    arrays = "[" * DEPTH + "]" * DEPTH
    objects = '{"a":' * DEPTH + "1" + "}" * DEPTH
    return [
        Hostile("deep:generate-adapters", (raw_json(GENERATE, '{"prompt":"x","adapters":' + arrays + "}"),)),
        Hostile("deep:generate-body", (raw_json(GENERATE, "[" * 100_000 + "]" * 100_000),)),
        Hostile(
            "deep:register-metadata",
            (
                raw_json(
                    REGISTER, '{"id":"deep","source":' + json.dumps(SOURCE) + ',"metadata":' + objects + "}"
                ),
            ),
        ),
        Hostile(
            "deep:preload-version",
            (raw_json(PRELOAD, '{"version":' + arrays + "}", path_parameters={"adapter_id": "watercolor"}),),
        ),
    ]


def tag_cases() -> list[Hostile]:
    cases = [
        Hostile(
            f"tag:{w}", (Step(GENERATE, {"json": {"prompt": f"a fox <lora:watercolor:{w}>", "steps": 1}}),)
        )
        for w in ("nan", "inf", "-inf", "99", "-5")
    ]
    ok = Step(GENERATE, {"json": {"prompt": "a fox <lora:watercolor:0.5>", "steps": 1}}, **status(200))
    return [*cases, Hostile("control:tag-0.5", (ok,))]


COERCIONS: list[tuple[str, dict[str, Any]]] = [
    ("steps-string", {"steps": "1"}),
    ("steps-bool", {"steps": True}),
    ("seed-float", {"seed": 1.0}),
    ("num-images-string", {"num_images": "1"}),
    ("width-string", {"width": "32"}),
    ("guidance-string", {"guidance_scale": "7"}),
    ("scale-string", {"adapters": [{"id": "watercolor", "scale": "0.5"}]}),
    ("version-string", {"adapters": [{"id": "watercolor", "version": "1"}]}),
]


def coercion_cases() -> list[Hostile]:
    cases = [
        # steps 1: within the server's limits, so a 422 can only be about the coerced field
        Hostile(
            f"coercion:{name}",
            (Step(GENERATE, {"json": {"prompt": "x", "steps": 1, **extra}}, **status(422)),),
        )
        for name, extra in COERCIONS
    ]
    for name, body in (("preload-version-string", {"version": "1"}), ("preload-pin-int", {"pin": 1})):
        step = Step(PRELOAD, {"json": body}, path_parameters={"adapter_id": "watercolor"}, **status(422))
        cases.append(Hostile(f"coercion:{name}", (step,)))
    return cases


def bucket_cases() -> list[Hostile]:
    sources = ["s3://127.0.0.1:43421/x.safetensors", "s3://B/k", "s3://ab/k", "s3://b..c/k", "s3://b%2Fc/k"]
    return [
        Hostile(
            f"bucket:{source}", (Step(REGISTER, {"json": {"id": "bucket", "source": source}}, **status(422)),)
        )
        for source in sources
    ]


def scale_cases() -> list[Hostile]:
    cases = [
        Hostile(
            f"scale:json-{value}",
            (
                Step(
                    REGISTER,
                    {"json": {"id": "scale", "source": SOURCE, "scale_default": value}},
                    **status(422),
                ),
            ),
        )
        for value in (1e308, 100.0, -5.0)
    ]
    body = '{"id":"scale","source":' + json.dumps(SOURCE) + ',"scale_default":NaN}'
    cases.append(Hostile("scale:json-NaN", (raw_json(REGISTER, body, **status(422)),)))
    return cases


def metadata_size_cases() -> list[Hostile]:
    """Issue 12's example through HTTP: a 600,000-character title, then show and preload the version."""
    register = Step(
        REGISTER,
        {"json": {"id": "big-title", "source": SOURCE, "metadata": {"title": "t" * 600_000}}},
        expect=lambda s: s in (201, 413, 422),
        expect_text="201 (or 413/422 refused)",
    )
    params = {"adapter_id": "big-title"}
    show = Step(
        SHOW_VERSION, {}, path_parameters={**params, "version": 1}, expect=shown, expect_text="200/404"
    )
    preload = Step(
        PRELOAD, {}, path_parameters=params, expect=lambda s: s in (200, 404), expect_text="200/404"
    )
    return [Hostile("metadata-size:title-600000", (register, show, preload))]


def text_cases() -> list[Hostile]:
    return [
        Hostile(
            "unicode:surrogate-prompt",
            (raw_json(GENERATE, '{"prompt":"\\ud800","steps":1}', expect=not_5xx),),
        ),
        Hostile(
            "unicode:nul-prompt", (raw_json(GENERATE, '{"prompt":"\\u0000","steps":1}', expect=not_5xx),)
        ),
        Hostile(
            "number:seed-1e400", (raw_json(GENERATE, '{"prompt":"x","steps":1,"seed":1e400}', **status(422)),)
        ),
        Hostile(
            "number:guidance-NaN",
            (raw_json(GENERATE, '{"prompt":"x","steps":1,"guidance_scale":NaN}', **status(422)),),
        ),
        Hostile("number:steps-1e30", (raw_json(GENERATE, '{"prompt":"x","steps":1e30}', **status(422)),)),
    ]


def upload_step(case: Case, adapter_id: str) -> Step:
    fields: dict[str, str] = {"id": adapter_id}
    if case.metadata is not None:
        fields["metadata"] = case.metadata if isinstance(case.metadata, str) else json.dumps(case.metadata)
    if case.scale_default is not None:
        fields["scale_default"] = repr(case.scale_default)
    if case.refuse:
        expect: dict[str, Any] = {"expect": is_4xx, "expect_text": "4xx"}
    elif case.must_register:
        expect = {"expect": lambda s: s in (200, 201), "expect_text": "201"}
    else:
        expect = {"expect": not_5xx, "expect_text": "not 5xx"}
    files = {"file": ("adapter.safetensors", case.data, "application/octet-stream")}
    return Step(REGISTER, {"files": files, "data": fields}, **expect)


def control_cases(base: BaseIdentity) -> list[Hostile]:
    """Valid registrations (an upload, an S3 source) that must succeed: the hostile ones have a baseline."""
    seed = kohya_seed(base, torch.float32)
    files = {
        "file": ("adapter.safetensors", serialise(seed.tensors, seed.metadata), "application/octet-stream")
    }
    created: dict[str, Any] = {"expect": lambda s: s in (200, 201), "expect_text": "201"}
    upload = Step(REGISTER, {"files": files, "data": {"id": "control-upload"}}, **created)
    source = Step(REGISTER, {"json": {"id": "control-source", "source": SOURCE}}, **created)
    return [Hostile("control:upload", (upload,)), Hostile("control:source", (source,))]


def upload_cases(base: BaseIdentity) -> list[Hostile]:
    """Each known adapter-file reproducer, uploaded; then its version shown (404 where it was refused)."""
    cases = []
    for key, case in reproducer_cases(base).items():
        adapter_id = f"upload-{key}"
        version = {"adapter_id": adapter_id, "version": 1}
        show = Step(SHOW_VERSION, {}, path_parameters=version, expect=shown, expect_text="200/404")
        cases.append(Hostile(f"upload:{key}", (upload_step(case, adapter_id), show)))
    return cases


def image_cases() -> list[Hostile]:
    return [
        Hostile(
            f"image:{case.label}",
            # 2 steps: the default strength 0.8 leaves int(2 × 0.8) = 1 denoising step
            (
                Step(
                    GENERATE, {"json": {"prompt": "a fox", "steps": 2, **case.fields}}, **status(case.status)
                ),
            ),
        )
        for case in hostile_image_cases()
    ]


def hostile_cases(base: BaseIdentity) -> list[Hostile]:
    return [
        *image_cases(),
        *deep_cases(),
        *tag_cases(),
        *coercion_cases(),
        *bucket_cases(),
        *scale_cases(),
        *metadata_size_cases(),
        *text_cases(),
        *control_cases(base),
        *upload_cases(base),
    ]
