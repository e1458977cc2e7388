"""The generator families, one file each; SPECS is the list the Generator wrapper and the family registry
(models/families.py) read. A new family is one more file here and one more entry in SPECS."""

from __future__ import annotations

from cycletune.models.generators.flux import FluxSpec
from cycletune.models.generators.generator_spec import GeneratorSpec
from cycletune.models.generators.sd3 import StableDiffusion3Spec
from cycletune.models.generators.sdxl import StableDiffusionXLSpec
from cycletune.models.generators.stable_diffusion import StableDiffusionSpec

SPECS: tuple[GeneratorSpec, ...] = (
    StableDiffusionSpec(),
    StableDiffusionXLSpec(),
    StableDiffusion3Spec(),
    FluxSpec(),
)


def spec_for_pipeline(class_name: str | None) -> GeneratorSpec:
    """The family spec of a model_index.json `_class_name`; a ValueError naming the supported ones otherwise."""
    for spec in SPECS:
        if class_name in spec.pipeline_class_names:
            return spec
    supported = sorted(name for spec in SPECS for name in spec.pipeline_class_names)
    raise ValueError(f"generator pipeline class {class_name!r} is not supported; supported: {supported}")
