"""PNG encoding with the generation parameters in a ``parameters`` tEXt chunk, as A1111 writes it."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def a1111_parameters(params: dict[str, Any]) -> str:
    """Render parameters in A1111's 'infotext' layout so its PNG-info tab and civitai read them."""
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = [
        ("Steps", params["steps"]),
        ("Sampler", params["sampler"]),
        ("CFG scale", params["guidance_scale"]),
        ("Seed", params["seed"]),
        ("Size", f"{params['width']}x{params['height']}"),
        ("Model hash", params["model_hash"][:10]),
        ("Model", params["model"]),
    ]
    if params.get("mode", "txt2img") != "txt2img":
        fields += [("Denoising strength", params["strength"]), ("Mode", params["mode"])]
    if params.get("lora_hashes"):
        fields.append(("Lora hashes", f'"{params["lora_hashes"]}"'))
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
