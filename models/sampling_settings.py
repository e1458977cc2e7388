"""How captions are decoded and images drawn outside training: the defaults live here and nowhere else.

Validation, evaluation, reranking, the generate CLI and `Generator.sample` all take these knobs; a default
that changes here changes for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSettings:
    """Seed of the initial noise, beam width of captions, and the sampler's steps and CFG scale of images."""

    seed: int = 0
    num_beams: int = 3
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
