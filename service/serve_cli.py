"""``loraswap serve`` (run the server) and ``loraswap generate`` (a small HTTP client)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from basemodel.errors import ConfigError
from basemodel.settings import load_settings


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP server (settings from LORASWAP_* env + flags)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--base-model", help="'tiny-sd', a diffusers folder or a .safetensors checkpoint")
    serve.add_argument(
        "--base-components",
        type=Path,
        help="diffusers folder that supplies what a single-file SD3/Flux checkpoint lacks (text encoders, "
        "tokenizers, VAE); see docs/models.md",
    )
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"])
    serve.add_argument("--attention", choices=["auto", "sdpa", "xformers"])
    serve.add_argument(
        "--text-encoder-device",
        choices=["cuda", "cpu", "offload"],
        help="where text encoders live: beside the denoiser (default), on the CPU, or on the GPU only "
        "while encoding (docs/deploy.md, 'Text encoders and GPU memory')",
    )
    serve.add_argument("--home", type=Path, help="state directory (default ./.loraswap)")
    serve.add_argument("--max-queue", type=int, help="waiting requests before 429")
    serve.add_argument("--request-timeout", type=float, dest="request_timeout_s", help="seconds before 504")
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="allow a non-loopback bind with no bearer tokens configured",
    )
    serve.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        default=None,
        help="report ready without a warm-up generation",
    )
    ray = serve.add_argument_group("Ray Serve (docs/deploy.md; needs the 'ray' extra)")
    ray.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve, routed by adapter")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas")
    serve.set_defaults(func=_serve)

    gen = subparsers.add_parser("generate", help="ask a running server for an image")
    gen.add_argument("prompt")
    gen.add_argument(
        "--server",
        default=os.environ.get("LORASWAP_SERVER", "http://127.0.0.1:8000"),
        help="server URL [default: $LORASWAP_SERVER, else http://127.0.0.1:8000]",
    )
    gen.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="ID[@V][:SCALE]",
        help="adapter to apply (repeatable)",
    )
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument(
        "--guidance-scale", type=float, help="default: the model family's (7.5; SD3 7; Flux 3.5)"
    )
    gen.add_argument("--true-cfg-scale", type=float, help="Flux: real CFG with --negative-prompt when > 1")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--scheduler", help="default: the model family's (ddim; euler on SD3 and Flux)")
    gen.add_argument("--num-images", type=int, default=1)
    image = gen.add_argument_group("image to image / inpainting (POST /v1/generate's init_image, mask_image)")
    image.add_argument("--init-image", type=Path, metavar="PATH", help="start from this PNG, JPEG or WebP")
    image.add_argument(
        "--mask", type=Path, metavar="PATH", help="with --init-image: repaint the white area (inpainting)"
    )
    image.add_argument(
        "--strength",
        type=float,
        metavar="X",
        help="with --init-image: how much to change it, 0..1 (default 0.8; 1 = start from noise)",
    )
    gen.add_argument("--token", help="bearer token (default: $LORASWAP_TOKEN)")
    gen.add_argument("--timeout", type=float, default=600.0)
    gen.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (and a plain POST /v1/generate instead of a job)",
    )
    gen.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # the top-level flag (loraswap -v generate) is the same one
        help="debug logging, the HTTP client's request lines included",
    )
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        help="output PNG (with several images: out-0.png, out-1.png, …)",
    )
    gen.set_defaults(func=_generate)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from basemodel.loader import resolve_base_model
    from service.app import create_app

    overrides = {
        k: getattr(args, k)
        for k in (
            "host",
            "port",
            "base_model",
            "base_components",
            "device",
            "dtype",
            "attention",
            "text_encoder_device",
            "home",
            "max_queue",
            "request_timeout_s",
            "allow_unauthenticated",
            "warmup",
        )
    }
    if args.ray:
        return _serve_ray({**overrides, "replicas": args.replicas, "autoscale": args.autoscale})
    if args.replicas is not None or args.autoscale is not None:
        raise ConfigError("--replicas and --autoscale need --ray")
    settings = load_settings(**overrides)
    resolve_base_model(settings.base_model, settings.models_dir)  # fail fast, before binding the port
    app = create_app(settings)
    logging.getLogger(__name__).info("serving on http://%s:%s", settings.host, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
    )
    _DrainingServer(config).run()
    return 0


def _serve_ray(args: dict[str, Any]) -> int:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--ray needs Ray Serve, which is not installed", hint="pip install 'loraswap[ray]'"
        ) from None
    from service.ray.cluster import run

    return run(args)


class _DrainingServer:
    """uvicorn's server, except that SIGTERM/SIGINT end with status 0 once in-flight work drained.

    (uvicorn re-raises the captured signal after shutdown, which makes the exit status -15.)
    """

    def __init__(self, config: Any) -> None:
        import uvicorn

        server = uvicorn.Server(config)

        @contextlib.contextmanager
        def capture_signals() -> Iterator[None]:
            previous = {
                sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        server.capture_signals = capture_signals  # type: ignore[method-assign]
        self._server = server

    def run(self) -> None:
        self._server.run()


def _generate(args: argparse.Namespace) -> int:
    from service.client import GenerateClient, parse_adapter_ref

    client = GenerateClient(args.server, token=args.token, timeout=args.timeout)
    body = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "num_images": args.num_images,
        "adapters": [parse_adapter_ref(ref) for ref in args.adapter],
    }
    for key in ("width", "height", "seed", "guidance_scale", "true_cfg_scale", "scheduler"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    body |= _image_inputs(args)
    bar = ProgressBar(sys.stderr) if args.progress else None
    try:
        result = client.generate(body, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    paths = client.save_images(result, args.output)
    timings = result.get("timings", {})
    print(f"seed {result['seed']}  total {timings.get('total_s', 0):.2f}s  -> {', '.join(map(str, paths))}")
    return 0


def _image_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """``--init-image`` / ``--mask`` as base64 fields, and ``--strength``; the server checks the images."""
    if args.init_image is None:
        if args.mask is not None or args.strength is not None:
            raise ConfigError(
                "--mask and --strength apply to an init image",
                hint="Add --init-image PATH (the image to change).",
            )
        return {}
    fields: dict[str, Any] = {"init_image": _read_image(args.init_image, "--init-image")}
    if args.mask is not None:
        fields["mask_image"] = _read_image(args.mask, "--mask")
    if args.strength is not None:
        fields["strength"] = args.strength
    return fields


def _read_image(path: Path, flag: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    return base64.b64encode(data).decode("ascii")


class ProgressBar:
    """``[########......] 3/10 steps`` redrawn in place on ``stream`` (fed by the job's step events)."""

    WIDTH = 30

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._drawn = False
        self._last: tuple[int, int] | None = None

    def __call__(self, step: int, steps: int) -> None:
        if steps <= 0 or (step, steps) == self._last:
            return
        self._last = (step, steps)
        filled = self.WIDTH * min(step, steps) // steps
        self._stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {step}/{steps} steps")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()


if __name__ == "__main__":
    sys.exit(1)
