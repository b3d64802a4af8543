"""PNG encoding with the generation parameters in a ``parameters`` tEXt chunk, as A1111 writes it."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def _weight(value: Any) -> str:
    """A weight as the shortest text that parses back to the same float (``0.7``, ``1.0``, ``-0.25``)."""
    return repr(float(value))


def lora_name(adapter: Mapping[str, Any]) -> str:
    """The name an adapter's tag and hash carry: ``id@version``, the version it was served from."""
    return f"{adapter['id']}@{adapter['version']}"


def lora_tag(adapter: Mapping[str, Any]) -> str:
    """A1111's ``<lora:NAME:WEIGHT>`` for one applied adapter (``adapters[i]`` of the parameters), pinned to
    its version; ``<lora:NAME:TE:UNET>`` when the text encoders and the UNet got different weights (A1111's
    form, which ``service.lora.request`` reads back as ``scale = TE``, ``unet_scale = UNET``)."""
    scale = adapter["scale"]
    te = adapter.get("text_encoder_scale", scale)
    unet = adapter.get("unet_scale", scale)
    weights = _weight(te) if te == unet else f"{_weight(te)}:{_weight(unet)}"
    return f"<lora:{lora_name(adapter)}:{weights}>"


def lora_hashes(adapters: Sequence[Mapping[str, Any]]) -> str:
    """A1111's ``Lora hashes`` value: ``NAME: first 12 hex of the file's sha256`` per tag, comma-joined."""
    return ", ".join(f"{lora_name(a)}: {a['sha256'][:12]}" for a in adapters)


def infotext_prompt(params: Mapping[str, Any]) -> str:
    """The prompt as the infotext writes it: the prompt the model saw, then one tag per applied adapter
    (from the prompt's tags and the ``adapters`` field alike), so the PNG alone asks for the same ones."""
    tags = [lora_tag(a) for a in params.get("adapters") or []]
    return " ".join([params["prompt"], *tags]) if tags else params["prompt"]


def a1111_parameters(params: dict[str, Any]) -> str:
    """Render parameters in A1111's 'infotext' layout so its PNG-info tab and civitai read them, and so
    sending it back through ``/sdapi/v1/txt2img`` draws the same image (adapters pinned to versions).
    ``CFG scale`` is the classifier-free scale that ran (1.0 on Flux without true CFG); a
    guidance-distilled model (Flux-dev) adds Forge's ``Distilled CFG Scale`` right after it."""
    lines = [infotext_prompt(params)]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    distilled = params.get("distilled_cfg_scale")
    fields = [
        ("Steps", params["steps"]),
        ("Sampler", params["sampler"]),
        ("CFG scale", params["cfg_scale"]),
        *([("Distilled CFG Scale", distilled)] if distilled is not None else []),
        ("Seed", params["seed"]),
        ("Size", f"{params['width']}x{params['height']}"),
        ("Model hash", params["model_hash"][:10]),
        ("Model", params["model"]),
    ]
    if params.get("mode", "txt2img") != "txt2img":
        fields += [("Denoising strength", params["strength"]), ("Mode", params["mode"])]
    if params.get("adapters"):
        fields.append(("Lora hashes", f'"{lora_hashes(params["adapters"])}"'))
    if params.get("ti_hashes"):
        fields.append(("TI hashes", f'"{params["ti_hashes"]}"'))
    fields.append(("Version", f"loraswap {params['version']}"))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def encode_png(image: Image.Image, params: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
