"""Model families by name: `FAMILIES[name]`, `detect(loader)` lives in `checkpoint`.

Register a new family by adding its instances here (see `base.py` for what it implements).
"""

from __future__ import annotations

from eridiffusion.families.base import Components, Cond, Family, TextEncoder
from eridiffusion.families.sd import StableDiffusion
from eridiffusion.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (StableDiffusionXL.sdxl(), StableDiffusion.sd15(), StableDiffusionXL.sdxl_tiny(), StableDiffusion.sd15_tiny(),
              StableDiffusionXL.sdxl_micro())
}


def register(family: Family) -> Family:
    """Add (or replace) a family by its name; returns it. Tests register toy families."""
    FAMILIES[family.name] = family
    return family


__all__ = ["FAMILIES", "Components", "Cond", "Family", "StableDiffusion", "StableDiffusionXL", "TextEncoder", "register"]
