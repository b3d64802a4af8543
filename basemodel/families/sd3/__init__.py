"""SD3 / SD3.5: the family (``family.py``) and its random test model (``tiny.py``).

``lora_keys.py`` (community key layouts: sd-scripts' SD3 names) plugs in through ``SD3.community_lora``.
"""

from basemodel.families.sd3.family import SD3

__all__ = ["SD3"]
