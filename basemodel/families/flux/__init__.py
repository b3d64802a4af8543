"""Flux.1 (dev, schnell): the family (``family.py``) and its random test model (``tiny.py``).

``lora_keys.py`` (community key layouts: kohya sd-scripts, XLabs, ai-toolkit) plugs in through
``Flux.community_lora``.
"""

from basemodel.families.flux.family import Flux

__all__ = ["Flux"]
