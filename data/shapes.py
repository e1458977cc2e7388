"""The shapes world: one coloured shape per image, captions from a small grammar, and a caption parser.

It is the smallest setting where cycle training can be checked end to end on a CPU: every image has a
known ground truth, every caption can be read back into attributes, and tiny models learn it in minutes.
Captions come from several paraphrase templates with synonyms ("big" = large, "middle" = center), so a
model cannot score well by memorising one sentence shape.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "center", "bottom left", "bottom right")

# Words a caption may use for each attribute value; the first is the canonical one.
SIZE_WORDS = {"small": ("small",), "large": ("large", "big")}
POSITION_WORDS = {position: (position,) for position in POSITIONS} | {"center": ("center", "middle")}

TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "a picture of a {colour} {shape}, {size}, at the {position}",
    "there is a {size} {colour} {shape} at the {position} of the image",
    "the {shape} in the {position} is {size} and {colour}",
)

COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
_CENTRES = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "center": (0.5, 0.5),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
_RADII = {"small": 0.12, "large": 0.22}  # half-extent as a fraction of the image side
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: edges stay readable at 32 px
_MIN_RESOLUTION = 8

# The split that makes unpaired data matter: these colour-shape combinations never appear in the paired
# training data, only in the unpaired image and caption sets and in the unseen test split. A Latin pattern:
# every colour still appears paired with two shapes and every shape with four colours.
UNSEEN_COMBINATIONS = frozenset(
    {
        ("red", "circle"),
        ("green", "circle"),
        ("blue", "square"),
        ("yellow", "square"),
        ("purple", "triangle"),
        ("orange", "triangle"),
    }
)
# The designed split (make split-experiment): the seen combinations of orange, the colour whose third
# combination (the triangle) is already unseen, are left out of the generator's paired data but kept in the
# captioner's. The generator then has never drawn orange, while the captioner has captioned it: knowledge only
# the captioner holds, which T2I2T must carry over (colour-shape combinations alone would not do: the generator
# draws unseen combinations of familiar colours and shapes from its paired data already).
CAPTIONER_ONLY_COMBINATIONS = frozenset({("orange", "circle"), ("orange", "square")})
Combinations = Literal["all", "seen", "unseen", "captioner_only", "generator_seen"]
COMBINATIONS: tuple[str, ...] = ("all", "seen", "unseen", "captioner_only", "generator_seen")

_PLACEHOLDER = re.compile(r"\{\w+\}")
_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")

WORDS: tuple[str, ...] = tuple(
    sorted(
        {"an"}
        | {word for template in TEMPLATES for word in re.findall(r"[a-z]+", _PLACEHOLDER.sub(" ", template))}
        | {word for phrase in (*SHAPES, *COLOURS) for word in phrase.split()}
        | {
            word
            for phrases in (*SIZE_WORDS.values(), *POSITION_WORDS.values())
            for p in phrases
            for word in p.split()
        }
    )
)

# Parser lexicon: tolerant to plurals, British spelling and a few extra synonyms a human might write.
_SHAPE_LEXICON = {word: shape for shape in SHAPES for word in (shape, shape + "s")}
_SIZE_LEXICON = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_VERTICAL_LEXICON = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL_LEXICON = {"left": "left", "right": "right"}
_CENTER_WORDS = frozenset({"center", "centre", "middle"})


@dataclass(frozen=True)
class Scene:
    """One image of the shapes world."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"Scene.{field} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class SceneAttributes:
    """Attributes read back from a caption (parse) or an image (the oracle); None where none was readable.

    A caption that names none or several conflicting values, or an image with no recognisable shape or
    colour, leaves that attribute None: one type for both readers, so their results compare directly.
    """

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    @property
    def scene(self) -> Scene | None:
        """The full Scene when every attribute was read, else None."""
        if None in (self.shape, self.colour, self.size, self.position):
            return None
        return Scene(self.shape, self.colour, self.size, self.position)


def all_scenes() -> list[Scene]:
    """Every scene of the world (3 shapes x 6 colours x 2 sizes x 5 positions = 180), in a fixed order."""
    return [Scene(*values) for values in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]


def random_scene(rng: np.random.Generator, combinations: Combinations = "all") -> Scene:
    """A uniformly drawn scene, optionally only among the seen or the unseen colour-shape combinations."""
    if combinations == "all":
        return Scene(
            *(vocabulary[rng.integers(len(vocabulary))] for vocabulary in (SHAPES, COLOURS, SIZES, POSITIONS))
        )
    allowed = scenes_of(combinations)
    return allowed[rng.integers(len(allowed))]


def is_unseen(scene: Scene) -> bool:
    """Whether the scene's colour-shape combination is held out of the paired split."""
    return (scene.colour, scene.shape) in UNSEEN_COMBINATIONS


def scenes_of(combinations: Combinations) -> list[Scene]:
    """The scenes of one part of the split: "all"; "seen" or "unseen" colour-shape combinations; of the
    designed split, "captioner_only" (seen, but not by the generator) or "generator_seen" (the rest of seen)."""
    if combinations not in COMBINATIONS:
        raise ValueError(f"combinations must be one of {COMBINATIONS}, got {combinations!r}")
    if combinations == "all":
        return all_scenes()
    if combinations == "unseen":
        return [scene for scene in all_scenes() if is_unseen(scene)]
    seen = [scene for scene in all_scenes() if not is_unseen(scene)]
    if combinations == "seen":
        return seen
    captioner_only = combinations == "captioner_only"
    return [s for s in seen if ((s.colour, s.shape) in CAPTIONER_ONLY_COMBINATIONS) == captioner_only]


def describe(scene: Scene, choice: np.random.Generator | int = 0) -> str:
    """A caption of `scene`.

    With a Generator the template and the synonyms are drawn from it; with an int that template index is
    used with the canonical words (so tests and evaluation can enumerate every sentence shape).
    """
    if isinstance(choice, np.random.Generator):
        template = TEMPLATES[choice.integers(len(TEMPLATES))]
        size_words, position_words = SIZE_WORDS[scene.size], POSITION_WORDS[scene.position]
        size = size_words[choice.integers(len(size_words))]
        position = position_words[choice.integers(len(position_words))]
    else:
        if not 0 <= choice < len(TEMPLATES):
            raise ValueError(f"template index must be in [0, {len(TEMPLATES)}), got {choice}")
        template, size, position = TEMPLATES[choice], scene.size, scene.position
    caption = template.format(size=size, colour=scene.colour, shape=scene.shape, position=position)
    return _ARTICLE_BEFORE_VOWEL.sub("an ", caption)


def parse(caption: str) -> SceneAttributes:
    """Read the scene attributes back from a caption, ignoring case, punctuation and filler words."""
    words = re.findall(r"[a-z]+", caption.lower())
    vertical = {_VERTICAL_LEXICON[word] for word in words if word in _VERTICAL_LEXICON}
    horizontal = {_HORIZONTAL_LEXICON[word] for word in words if word in _HORIZONTAL_LEXICON}
    centered = any(word in _CENTER_WORDS for word in words)
    if centered and not vertical and not horizontal:
        positions = {"center"}
    elif not centered and len(vertical) == 1 and len(horizontal) == 1:
        positions = {f"{vertical.pop()} {horizontal.pop()}"}
    else:
        positions = set()
    return SceneAttributes(
        shape=_only({_SHAPE_LEXICON[word] for word in words if word in _SHAPE_LEXICON}),
        colour=_only({word for word in words if word in COLOUR_RGB}),
        size=_only({_SIZE_LEXICON[word] for word in words if word in _SIZE_LEXICON}),
        position=_only(positions),
    )


def render(scene: Scene, resolution: int = 32, seed: int = 0) -> Image.Image:
    """Draw `scene` as an RGB image; `seed` varies the light background, the hue and a small jitter.

    The same (scene, resolution, seed) always gives the same pixels.
    """
    if resolution < _MIN_RESOLUTION:
        raise ValueError(f"resolution must be at least {_MIN_RESOLUTION} px, got {resolution}")
    rng = np.random.default_rng(seed)
    gray = rng.integers(215, 246)
    background = tuple(int(gray + tint) for tint in rng.integers(-8, 9, size=3))
    colour = tuple(
        int(np.clip(value + jitter, 0, 255))
        for value, jitter in zip(COLOUR_RGB[scene.colour], rng.integers(-12, 13, size=3), strict=True)
    )
    side = resolution * _SUPERSAMPLE
    centre_x, centre_y = (side * (value + rng.uniform(-0.03, 0.03)) for value in _CENTRES[scene.position])
    radius = side * _RADII[scene.size] * rng.uniform(0.92, 1.08)
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    if scene.shape == "circle":
        draw.ellipse(
            (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius), fill=colour
        )
    elif scene.shape == "square":
        half = radius * 0.9
        draw.rectangle((centre_x - half, centre_y - half, centre_x + half, centre_y + half), fill=colour)
    else:  # an upright equilateral triangle whose centroid is the centre
        circumradius = radius * 1.15
        angles = (-90.0, 30.0, 150.0)
        draw.polygon(
            [
                (
                    centre_x + circumradius * math.cos(math.radians(a)),
                    centre_y + circumradius * math.sin(math.radians(a)),
                )
                for a in angles
            ],
            fill=colour,
        )
    return canvas.reduce(_SUPERSAMPLE)


def _only(values: set[str]) -> str | None:
    return next(iter(values)) if len(values) == 1 else None
