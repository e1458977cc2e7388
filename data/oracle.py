"""A deterministic image oracle for the shapes world: read (shape, colour, size, position) back from pixels.

It is the ground truth for evaluations that have no captioner to trust: a generated image is scored by
reading its attributes here and comparing them with the scene its caption describes. So it must read
renders essentially perfectly, survive what generators do to images (noise, blur, a shifted shape, a
faded colour) and say "unreadable" (None) rather than guess when there is no such shape or colour.

Method. The background is the median of the border pixels; pixels far from it form the blob (the largest
8-connected component). The blob's interior colour (the core) turns every pixel near the blob into a soft
coverage between 0 (background) and 1 (shape), which keeps the measurements sub-pixel accurate at 32 px:
- position: the coverage centroid; "center" inside the middle band, else its quadrant;
- shape: the normalised complex moments |sum a z^k| / A^(1 + k/2) for k = 2, 3, 4 of the coverage a around
  the centroid (z = x + iy, A = sum a). Circles, squares and equilateral triangles all have a k=2 moment
  of 0 (not elongated); only a triangle has a k=3 moment, only a square a k=4 one. An isotropic blur adds
  an independent isotropic offset to every point of the shape, whose complex moments vanish, so these
  moments survive soft edges that would push a bounding-box fill ratio from square towards circle. They
  are also rotation invariant: an upside-down triangle or a diamond still reads as triangle or square;
- size: the area divided by the shape's area at the cut-off radius between small and large;
- colour: the palette colour nearest to the core, allowing a blend towards the background (faded cores).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import fields

import numpy as np
import torch
from PIL import Image

from cycletune.data.images import load_rgb
from cycletune.data.shapes import COLOUR_RGB, Scene, SceneAttributes

ImageLike = Image.Image | torch.Tensor | np.ndarray

_ATTRIBUTES = tuple(field.name for field in fields(Scene))
_MIN_SIDE = 8

# A pixel is part of the blob when its RGB distance (0..sqrt 3) from the background exceeds half the image's
# strong contrast and at least _MIN_BLOB_CONTRAST: every palette colour is >= 0.7 away from the light
# backgrounds of render(), while pixel noise of sigma 0.05 per channel stays well below 0.25.
_MIN_BLOB_CONTRAST = 0.25
_STRONG_CONTRAST_QUANTILE = 0.99
# Renders cover 2%..19% of the image; a blob outside these bounds is a speck or noise, not a shape.
_MIN_BLOB_FRACTION = 0.004
_MAX_BLOB_FRACTION = 0.4
# Anti-aliased and blurred edges up to this far around the blob count towards its moments, where the
# neighbourhood is covered enough to be shape rather than background noise (whose weight grows as |z|^4).
_COVERAGE_MARGIN_PX = 2
_MIN_NEIGHBOURHOOD_COVERAGE = 0.1

# Moment features are scaled so that one unit is the k=2 moment of a 2:1 ellipse, the k=3 moment of an
# equilateral triangle and the k=4 moment of a square.
_MOMENT_UNITS = np.array([3 / (8 * math.pi), 4 / (45 * 3**0.25), 1 / 60])
_SHAPE_PROTOTYPES = {"circle": (0.0, 0.0, 0.0), "square": (0.0, 0.0, 1.0), "triangle": (0.0, 1.0, 0.0)}
_MAX_SHAPE_DISTANCE = 0.6  # farther from every prototype than this: no shape of the world

# A render's radius r (fraction of the side) is 0.110..0.130 when small and 0.202..0.238 when large, and its
# area is factor * r^2: pi (circle), 1.8^2 (square, half-side 0.9 r), 3 sqrt(3) / 4 * 1.15^2 (triangle,
# circumradius 1.15 r). Cut at r = 0.166. When the shape is unknown, cut between the largest small area
# (a square, 0.234^2) and the smallest large one (a triangle, 0.265^2).
_LARGE_RADIUS = 0.166
_LARGE_AREA_FRACTION: dict[str | None, float] = {
    "circle": math.pi * _LARGE_RADIUS**2,
    "square": (1.8 * _LARGE_RADIUS) ** 2,
    "triangle": 3 * math.sqrt(3) / 4 * (1.15 * _LARGE_RADIUS) ** 2,
    None: 0.25**2,
}

# Shapes sit at 0.27 / 0.5 / 0.73 of the side: the middle band reaches halfway to the corner positions.
_CENTER_HALF_WIDTH = (0.5 - 0.27) / 2

_PALETTE = {name: np.array(rgb, dtype=np.float64) / 255 for name, rgb in COLOUR_RGB.items()}
# A core may fade halfway to the background (a blurred small shape) and keep its colour name; farther than
# _MAX_COLOUR_DISTANCE (RGB, 0..1) from every such blend it has none. Degraded renders stay within 0.1 of
# their colour's blend and >= 0.17 from every other colour's.
_BLEND_RANGE = (0.5, 1.2)
_MAX_COLOUR_DISTANCE = 0.15


def read_scene(image: ImageLike) -> SceneAttributes:
    """Read one image: a PIL image, a [3, H, W] tensor in [0, 1], or an [H, W, 3] array (uint8 or [0, 1])."""
    return _read_pixels(_as_pixels(image))


def read_scenes(pixels01: torch.Tensor) -> list[SceneAttributes]:
    """Read a batch of [B, 3, H, W] images in [0, 1] (a generator's output)."""
    if pixels01.ndim != 4 or pixels01.shape[1] != 3:
        raise ValueError(f"read_scenes expects a [B, 3, H, W] tensor, got shape {tuple(pixels01.shape)}")
    batch = pixels01.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    return [
        _read_pixels(_checked(pixels, f"image {index} of the batch")) for index, pixels in enumerate(batch)
    ]


def attribute_accuracy(readings: Sequence[SceneAttributes], scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction of readings that match their scene, per attribute and for all four at once ("all").

    An unreadable attribute (None) counts as wrong, so a generator cannot score by drawing nothing.
    """
    if len(readings) != len(scenes):
        raise ValueError(f"attribute_accuracy got {len(readings)} readings for {len(scenes)} scenes")
    if not scenes:
        raise ValueError("attribute_accuracy needs at least one reading")
    matches = np.array(
        [
            [getattr(reading, name) == getattr(scene, name) for name in _ATTRIBUTES]
            for reading, scene in zip(readings, scenes, strict=True)
        ]
    )
    accuracy = {name: float(column.mean()) for name, column in zip(_ATTRIBUTES, matches.T, strict=True)}
    return accuracy | {"all": float(matches.all(axis=1).mean())}


def _as_pixels(image: ImageLike) -> np.ndarray:
    """The image as an [H, W, 3] float64 array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(load_rgb(image), dtype=np.float64) / 255
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"read_scene expects a [3, H, W] tensor, got shape {tuple(image.shape)}")
        return _checked(image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy(), "the tensor")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"read_scene expects an [H, W, 3] array, got shape {image.shape}")
        if image.dtype == np.uint8:
            return image.astype(np.float64) / 255
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"read_scene expects a uint8 or float array, got dtype {image.dtype}")
        return _checked(image.astype(np.float64), "the array")
    raise TypeError(f"read_scene expects a PIL image, a tensor or a numpy array, got {type(image).__name__}")


def _checked(pixels: np.ndarray, name: str) -> np.ndarray:
    """Float pixels clipped to [0, 1] (generators overshoot a little); NaN or inf is a broken generator."""
    if not np.isfinite(pixels).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.clip(pixels, 0.0, 1.0)


def _read_pixels(pixels: np.ndarray) -> SceneAttributes:
    height, width = pixels.shape[:2]
    if min(height, width) < _MIN_SIDE:
        raise ValueError(f"images must be at least {_MIN_SIDE} px on each side, got {width}x{height}")
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    contrast = np.linalg.norm(pixels - background, axis=2)
    threshold = max(_MIN_BLOB_CONTRAST, 0.5 * np.quantile(contrast, _STRONG_CONTRAST_QUANTILE))
    blob = _largest_component(contrast > threshold)
    if not _MIN_BLOB_FRACTION <= blob.mean() <= _MAX_BLOB_FRACTION:
        return SceneAttributes()
    # The interior (blob pixels whose 8 neighbours are blob too) is free of edge blending, and unlike the
    # most contrasted pixels it is not biased towards noise; a blob too thin to have one uses all of it.
    interior = blob & ~_dilate(~blob, 1)
    core = pixels[interior if interior.any() else blob].mean(axis=0)
    coverage = _coverage(pixels, background, core)
    coverage *= _dilate(blob, _COVERAGE_MARGIN_PX) & (_box_mean(coverage) > _MIN_NEIGHBOURHOOD_COVERAGE)
    area = coverage.sum()
    if area < _MIN_BLOB_FRACTION * height * width:
        return SceneAttributes()
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    centre_x, centre_y = (coverage * xs).sum() / area, (coverage * ys).sum() / area
    offsets = (xs - centre_x) + 1j * (ys - centre_y)
    moments = np.array([abs((coverage * offsets**k).sum()) / area ** (1 + k / 2) for k in (2, 3, 4)])
    shape = _shape(moments / _MOMENT_UNITS)
    return SceneAttributes(
        shape=shape,
        colour=_colour(core, background),
        size="large" if area / (height * width) > _LARGE_AREA_FRACTION[shape] else "small",
        position=_position(centre_x / width, centre_y / height),
    )


def _coverage(pixels: np.ndarray, background: np.ndarray, core: np.ndarray) -> np.ndarray:
    """How much of each pixel the shape covers: its position on the line from background to core colour."""
    direction = core - background
    return ((pixels - background) @ direction) / (direction @ direction)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of `mask` (all False when `mask` is empty)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    sizes = [0]
    for seed in zip(*np.nonzero(mask), strict=True):
        if labels[seed]:
            continue
        label = len(sizes)
        labels[seed] = label
        queue, size = deque([seed]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        sizes.append(size)
    return labels == int(np.argmax(sizes)) if len(sizes) > 1 else np.zeros_like(mask)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """`mask` grown by `steps` pixels in every direction (8-neighbourhood); outside the image counts False."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        rows = padded[:-2] | padded[1:-1] | padded[2:]
        mask = rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]
    return mask


def _box_mean(values: np.ndarray) -> np.ndarray:
    """The mean of each pixel's 3x3 neighbourhood (edges repeated)."""
    padded = np.pad(values, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9


def _shape(features: np.ndarray) -> str | None:
    """The shape whose moment prototype is nearest to `features`, if near enough."""
    distances = {
        name: float(np.linalg.norm(features - prototype)) for name, prototype in _SHAPE_PROTOTYPES.items()
    }
    nearest = min(distances, key=distances.__getitem__)
    return nearest if distances[nearest] <= _MAX_SHAPE_DISTANCE else None


def _position(x: float, y: float) -> str:
    if abs(x - 0.5) < _CENTER_HALF_WIDTH and abs(y - 0.5) < _CENTER_HALF_WIDTH:
        return "center"
    return f"{'top' if y < 0.5 else 'bottom'} {'left' if x < 0.5 else 'right'}"


def _colour(core: np.ndarray, background: np.ndarray) -> str | None:
    """The palette colour whose blend with the background comes nearest to `core`, if near enough."""
    offset = core - background
    distances = {}
    for name, rgb in _PALETTE.items():
        direction = rgb - background
        blend = np.clip((offset @ direction) / (direction @ direction), *_BLEND_RANGE)
        distances[name] = float(np.linalg.norm(offset - blend * direction))
    nearest = min(distances, key=distances.__getitem__)
    return nearest if distances[nearest] <= _MAX_COLOUR_DISTANCE else None
