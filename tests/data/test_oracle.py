"""The image oracle reads renders back into their scenes, survives degraded images and refuses blank ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from cycletune.data.oracle import attribute_accuracy, read_scene, read_scenes
from cycletune.data.shapes import COLOUR_RGB, Scene, SceneAttributes, random_scene, render

TEST_SEED = 20261125
SAMPLES = 500
MAX_SHIFT_PX = 2
NOISE_SIGMA = 0.05
BACKGROUND = (230, 230, 230)


def _random_renders(resolution: int, rng: np.random.Generator) -> tuple[list[Scene], list[Image.Image]]:
    scenes = [random_scene(rng) for _ in range(SAMPLES)]
    return scenes, [render(scene, resolution, seed=int(rng.integers(2**31))) for scene in scenes]


def _degrade(image: Image.Image, blur: ImageFilter.Filter, rng: np.random.Generator) -> np.ndarray:
    """Blur, shift by up to MAX_SHIFT_PX (the revealed edge repeats the border) and add Gaussian noise."""
    pixels = np.asarray(image.filter(blur), dtype=np.float64) / 255
    shift_y, shift_x = rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, size=2)
    padded = np.pad(pixels, ((MAX_SHIFT_PX,) * 2, (MAX_SHIFT_PX,) * 2, (0, 0)), mode="edge")
    top, left = MAX_SHIFT_PX - shift_y, MAX_SHIFT_PX - shift_x
    shifted = padded[top : top + image.height, left : left + image.width]
    return np.clip(shifted + rng.normal(0.0, NOISE_SIGMA, shifted.shape), 0.0, 1.0)


def _drawing(figure: str, points: list[tuple[float, float]], rgb: tuple[int, int, int]) -> Image.Image:
    """A 64 px image with one figure drawn by ImageDraw (`points` in fractions of the side)."""
    image = Image.new("RGB", (64, 64), BACKGROUND)
    getattr(ImageDraw.Draw(image), figure)([(x * 64, y * 64) for x, y in points], fill=rgb)
    return image


@pytest.mark.parametrize("resolution", [32, 64])
def test_clean_renders_read_back_to_their_scene(resolution: int) -> None:
    scenes, images = _random_renders(resolution, np.random.default_rng(TEST_SEED))
    accuracy = attribute_accuracy([read_scene(image) for image in images], scenes)
    print(f"clean {resolution} px: {accuracy}")
    assert accuracy["all"] >= 0.99, accuracy


@pytest.mark.parametrize("resolution", [32, 64])
def test_noisy_blurred_shifted_renders_read_back(resolution: int) -> None:
    rng = np.random.default_rng(TEST_SEED + resolution)
    scenes, images = _random_renders(resolution, rng)
    blurs = (ImageFilter.GaussianBlur(0.7), ImageFilter.BoxBlur(1))  # BoxBlur(1) is a 3x3 box
    degraded = [_degrade(image, blurs[index % 2], rng) for index, image in enumerate(images)]
    clean = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
    assert np.abs(np.stack(degraded) - clean).mean() > 0.03  # the degradation is real, no template fits
    accuracy = attribute_accuracy([read_scene(pixels) for pixels in degraded], scenes)
    print(f"noise {NOISE_SIGMA} + blur + shift {MAX_SHIFT_PX} px, {resolution} px: {accuracy}")
    assert accuracy["all"] >= 0.95, accuracy


def test_every_input_format_reads_the_same() -> None:
    scene = Scene("triangle", "orange", "large", "bottom left")
    image = render(scene, 32, seed=7)
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    overshooting = torch.where(tensor > 0.8, tensor + 0.5, tensor)  # a generator's background beyond 1
    readings = [
        read_scene(image),
        read_scene(image.convert("RGBA")),
        read_scene(array),
        read_scene(array / 255.0),
        read_scene(tensor),
        *read_scenes(torch.stack([tensor, overshooting])),
    ]
    assert all(reading.scene == scene for reading in readings), readings


def test_blank_and_noise_images_are_unreadable() -> None:
    rng = np.random.default_rng(TEST_SEED)
    for resolution in (32, 64):
        blank = np.full((resolution, resolution, 3), 0.9)
        assert read_scene(blank) == SceneAttributes()
        assert read_scene(np.zeros((resolution, resolution, 3))) == SceneAttributes()
        noise = torch.rand(6, 3, resolution, resolution, generator=torch.Generator().manual_seed(resolution))
        saturated = (noise > 0.5).float()
        gray_noise = np.clip(0.5 + rng.normal(0.0, 0.3, (resolution, resolution, 3)), 0.0, 1.0)
        for reading in [*read_scenes(noise), *read_scenes(saturated), read_scene(gray_noise)]:
            assert reading == SceneAttributes()
            assert reading.scene is None


def test_unknown_figures_and_colours_are_not_named() -> None:
    ellipse = _drawing("ellipse", [(0.2, 0.4), (0.8, 0.6)], COLOUR_RGB["red"])
    assert read_scene(ellipse) == SceneAttributes(None, "red", "large", "center")
    bar = _drawing("rectangle", [(0.1, 0.45), (0.9, 0.55)], COLOUR_RGB["green"])
    assert read_scene(bar).shape is None
    gray_square = _drawing("rectangle", [(0.6, 0.6), (0.85, 0.85)], (128, 128, 128))
    assert read_scene(gray_square) == SceneAttributes("square", None, "small", "bottom right")


def test_shapes_are_read_in_any_orientation() -> None:
    upside_down = _drawing("polygon", [(0.3, 0.3), (0.7, 0.3), (0.5, 0.65)], COLOUR_RGB["blue"])
    assert read_scene(upside_down).shape == "triangle"
    diamond = _drawing(
        "polygon", [(0.15, 0.27), (0.27, 0.15), (0.39, 0.27), (0.27, 0.39)], COLOUR_RGB["purple"]
    )
    assert read_scene(diamond) == SceneAttributes("square", "purple", "small", "top left")


def test_attribute_accuracy_counts_each_attribute_and_all_four() -> None:
    scenes = [
        Scene("circle", "red", "small", "center"),
        Scene("square", "blue", "large", "top left"),
        Scene("triangle", "green", "small", "bottom right"),
        Scene("circle", "yellow", "large", "top right"),
    ]
    readings = [
        SceneAttributes("circle", "red", "small", "center"),  # all right
        SceneAttributes("square", "blue", "small", "top left"),  # wrong size
        SceneAttributes(None, "green", "small", "bottom right"),  # shape unreadable counts as wrong
        SceneAttributes(),  # nothing readable
    ]
    assert attribute_accuracy(readings, scenes) == {
        "shape": 0.5,
        "colour": 0.75,
        "size": 0.5,
        "position": 0.75,
        "all": 0.25,
    }
    assert readings[0].scene == scenes[0] and readings[2].scene is None
    with pytest.raises(ValueError, match="2 readings for 4 scenes"):
        attribute_accuracy(readings[:2], scenes)
    with pytest.raises(ValueError, match="at least one"):
        attribute_accuracy([], [])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[3, H, W\] tensor"):
        read_scene(torch.zeros(32, 32, 3))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] tensor"):
        read_scenes(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\] array"):
        read_scene(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="dtype int64"):
        read_scene(np.zeros((32, 32, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="image 1 of the batch contains NaN"):
        read_scenes(torch.stack([torch.zeros(3, 32, 32), torch.full((3, 32, 32), float("nan"))]))
    with pytest.raises(ValueError, match="at least 8 px"):
        read_scene(np.zeros((4, 32, 3)))
    with pytest.raises(TypeError, match="list"):
        read_scene([[0.0, 0.0, 0.0]])  # type: ignore[arg-type]
