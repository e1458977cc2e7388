"""The captioner families, one file each; SPECS is the list the Captioner wrapper and the family registry
(models/families.py) read. A new family is one more file here and one more entry in SPECS."""

from __future__ import annotations

from transformers import PretrainedConfig

from cycletune.models.captioners.blip import BlipSpec
from cycletune.models.captioners.blip2 import Blip2Spec
from cycletune.models.captioners.git import GitSpec
from cycletune.models.captioners.idefics import IdeficsSpec
from cycletune.models.captioners.smolvlm import SmolVLMSpec
from cycletune.models.captioners.spec import CaptionerSpec

SPECS: tuple[CaptionerSpec, ...] = (BlipSpec(), Blip2Spec(), GitSpec(), SmolVLMSpec(), IdeficsSpec())


def spec_for(config: PretrainedConfig) -> CaptionerSpec:
    """The family spec of a loaded config; a ValueError naming the supported model types otherwise."""
    for spec in SPECS:
        if config.model_type in spec.model_types:
            spec.check_config(config)
            return spec
    supported = sorted(model_type for spec in SPECS for model_type in spec.model_types)
    raise ValueError(f"captioner model type {config.model_type!r} is not supported; supported: {supported}")
