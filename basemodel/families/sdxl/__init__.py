"""SDXL: the family (``family.py``), its random test model (``tiny.py``) and its single-file (SGM)
checkpoint assembly (``single_file.py``)."""

from basemodel.families.sdxl.family import SDXL

__all__ = ["SDXL"]
