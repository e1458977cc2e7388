"""Turn any image file a dataset may hold into an 8-bit RGB picture, and that picture into pixels01.

Real caption datasets contain grayscale scans, palette GIFs with transparency, CMYK JPEGs from print
archives, 16-bit PNGs from scientific cameras, phone photos that are only upright after their EXIF
rotation, and the occasional truncated download. Pillow's plain `convert("RGB")` clamps 16-bit and float
values instead of scaling them and turns transparent pixels black, so every mode is handled here once.
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

ImageInput = str | os.PathLike | bytes | BinaryIO | Image.Image
# What a record points at: a file, or a callable that decodes lazily (an in-memory dataset row).
ImageSource = Path | Callable[[], ImageInput]

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)
_BOMB_CHECK_LOCK = threading.Lock()


class BadImage(ValueError):
    """An image that cannot be decoded (unreadable, truncated, too large); the message names the file."""


def describe_source(source: ImageInput) -> str:
    """A short human name for an image source, used in error messages and skip warnings."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or f"<in-memory {source.mode} image {source.size}>"
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", "<file object>"))


def load_rgb(source: ImageInput, *, min_side: int | None = None) -> Image.Image:
    """Decode `source` into an upright 8-bit RGB image.

    `min_side` is the smallest short side the caller still needs (the training resolution): JPEGs are then
    decoded at a reduced scale (draft mode), which keeps huge photos cheap. Files above Pillow's
    decompression-bomb threshold (2 * Image.MAX_IMAGE_PIXELS, read at call time; None disables it) are
    refused with BadImage instead of being decoded, unless a JPEG draft brings them under it.
    Any decoding failure is raised as BadImage naming the file, so loaders can skip and count it.
    """
    if isinstance(source, Image.Image):
        return _upright_rgb(source, describe_source(source))
    name = describe_source(source)
    opened = io.BytesIO(source) if isinstance(source, bytes) else source
    pixel_limit = Image.MAX_IMAGE_PIXELS
    try:
        with _pillow_bomb_check_disabled(), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(opened)
        with image:
            image.draft(None, _draft_request(image.size, min_side, pixel_limit))
            if pixel_limit is not None and image.size[0] * image.size[1] > 2 * pixel_limit:
                raise BadImage(
                    f"{name}: {image.size[0]}x{image.size[1]} pixels exceed the decompression-bomb limit "
                    f"(2 * PIL.Image.MAX_IMAGE_PIXELS = {2 * pixel_limit}); raise that limit to accept it"
                )
            image.load()
            return _upright_rgb(image, name)
    except BadImage:
        raise
    except (
        Exception
    ) as error:  # decoders raise OSError, ValueError, SyntaxError, struct.error, ... on bad files
        raise BadImage(f"{name}: cannot decode image ({type(error).__name__}: {error})") from error


def to_tensor(
    image: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False
) -> torch.Tensor:
    """Resize an RGB image to a [3, resolution, resolution] float tensor in [0, 1] ("pixels01").

    center_crop=True scales the short side to `resolution` and crops the middle (keeps aspect ratio);
    center_crop=False squashes the whole image to a square, as BLIP's own processor does, so nothing a
    caption mentions near the border is cut away. `flip` mirrors left-right.
    """
    if image.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image (use load_rgb first), got mode {image.mode}")
    width, height = image.size
    if center_crop:
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    else:
        size = (resolution, resolution)
    resized = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    resized = resized.crop((left, top, left + resolution, top + resolution))
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(resized, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_pixels(images: Sequence[ImageSource], resolution: int) -> torch.Tensor:
    """[B, 3, resolution, resolution] pixels01, each image scaled and center-cropped to a square."""
    return torch.stack(
        [
            to_tensor(load_rgb(image() if callable(image) else image, min_side=resolution), resolution)
            for image in images
        ]
    )


@contextmanager
def _pillow_bomb_check_disabled() -> Iterator[None]:
    """Let Image.open read the header of a huge file; load_rgb applies the same limit after JPEG draft.

    Pillow reads the limit from a module global, so it is swapped under a lock and always restored.
    """
    with _BOMB_CHECK_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _draft_request(size: tuple[int, int], min_side: int | None, pixel_limit: int | None) -> tuple[int, int]:
    """The smallest decode size that keeps the short side >= min_side and the pixel count within the limit."""
    width, height = size
    scale = 1.0 if min_side is None else min(1.0, min_side / max(1, min(width, height)))
    if pixel_limit is not None and width * height > pixel_limit:
        scale = min(scale, math.sqrt(pixel_limit / (width * height)))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _upright_rgb(image: Image.Image, name: str) -> Image.Image:
    """Apply EXIF orientation, then convert to 8-bit RGB (exif_transpose always returns a new image)."""
    try:
        return _convert_to_rgb(ImageOps.exif_transpose(image))
    except Exception as error:  # unsupported modes and corrupt EXIF blocks surface here
        raise BadImage(f"{name}: cannot convert {image.mode} image to RGB ({error})") from error


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32)
        return _gray_to_rgb(np.clip(values, 0, 65535) / 257.0)
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        # Floats in [0, 1] are normalised intensities; anything larger is taken as a 16-bit range.
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0 / 257.0
        return _gray_to_rgb(np.clip(values, 0, None) * scale)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    """8-bit gray levels (already scaled to [0, 255]) as an RGB image."""
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
