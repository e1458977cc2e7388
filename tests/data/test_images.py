"""load_rgb must turn every image mode into the RGB values a viewer shows, and to_tensor must resize right."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cycletune.data.images import BadImage, load_rgb, to_tensor

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def first_row(image: Image.Image) -> list[tuple[int, int, int]]:
    assert image.mode == "RGB"
    return [image.getpixel((x, 0)) for x in range(image.width)]


def gray(*levels: int) -> list[tuple[int, int, int]]:
    return [(level, level, level) for level in levels]


def sixteen_bit_png(tmp_path: Path) -> Path:
    image = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16))
    image.save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"  # the file really is a 16-bit PNG
    return tmp_path / "sixteen.png"


def big_endian_tiff(tmp_path: Path) -> Path:
    values = np.array([[0, 32896, 65535]], dtype=">u2")
    Image.frombytes("I;16B", (3, 1), values.tobytes()).save(tmp_path / "big_endian.tif")
    assert Image.open(tmp_path / "big_endian.tif").mode == "I;16B"
    return tmp_path / "big_endian.tif"


def thirty_two_bit_tiff(tmp_path: Path) -> Path:
    Image.fromarray(np.array([[32896, 70000, -5]], dtype=np.int32)).save(tmp_path / "int32.tif")
    assert Image.open(tmp_path / "int32.tif").mode == "I"
    return tmp_path / "int32.tif"


def palette_with_transparency(tmp_path: Path, suffix: str) -> Path:
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *BLUE])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette entry 0 (red) is fully transparent
    image.save(tmp_path / f"palette{suffix}")
    return tmp_path / f"palette{suffix}"


def cmyk_tiff(tmp_path: Path) -> Path:
    image = Image.new("CMYK", (2, 1), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    image.putpixel((1, 0), (0, 0, 0, 255))  # full black
    image.save(tmp_path / "cmyk.tif")
    return tmp_path / "cmyk.tif"


def one_bit_png(tmp_path: Path) -> Path:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    return tmp_path / "bits.png"


MODE_CASES = {
    "L": (lambda tmp: Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)), gray(0, 77, 255)),
    # alpha 0 shows the white page, 255 the colour, 128 a mix: 100 * 128/255 + 255 * 127/255 = 177.2
    "LA": (
        lambda tmp: Image.frombytes("LA", (3, 1), bytes([100, 0, 100, 255, 100, 128])),
        gray(255, 100, 177),
    ),
    "RGBA": (
        lambda tmp: Image.frombytes("RGBA", (3, 1), bytes([*RED, 0, *BLUE, 255, *RED, 128])),
        [WHITE, BLUE, (255, 127, 127)],
    ),
    "P+transparency png": (lambda tmp: palette_with_transparency(tmp, ".png"), [WHITE, BLUE]),
    "P+transparency gif": (lambda tmp: palette_with_transparency(tmp, ".gif"), [WHITE, BLUE]),
    "CMYK tiff": (cmyk_tiff, [RED, (0, 0, 0)]),
    "I;16 png": (sixteen_bit_png, gray(0, 1, 128, 255)),
    "I;16B tiff": (big_endian_tiff, gray(0, 128, 255)),
    "I;16L": (
        lambda tmp: Image.frombytes("I;16L", (2, 1), np.array([[32896, 65535]], dtype="<u2").tobytes()),
        gray(128, 255),
    ),
    # 32-bit 'I' holding 16-bit values (how older Pillow opens 16-bit PNGs): scaled, out-of-range clipped
    "I": (
        lambda tmp: Image.fromarray(np.array([[32896, 65535, 70000, -5]], dtype=np.int32)),
        gray(128, 255, 255, 0),
    ),
    "I tiff": (thirty_two_bit_tiff, gray(128, 255, 0)),
    "F in [0, 1]": (
        lambda tmp: Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)),
        gray(0, 128, 255),
    ),
    "F in 16-bit range": (
        lambda tmp: Image.fromarray(np.array([[0.0, 32896.0, 65535.0]], dtype=np.float32)),
        gray(0, 128, 255),
    ),
    "1 png": (one_bit_png, gray(0, 255)),
    "1x1": (lambda tmp: Image.new("RGB", (1, 1), (10, 20, 30)), [(10, 20, 30)]),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_every_mode_converts_to_the_expected_rgb_values(case: str, tmp_path: Path) -> None:
    build, expected = MODE_CASES[case]
    assert first_row(load_rgb(build(tmp_path))) == expected


def test_cmyk_jpeg_decodes_to_its_colour(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    pixel = np.array(load_rgb(tmp_path / "cmyk.jpg").getpixel((8, 8)))
    assert np.abs(pixel - np.array(RED)).max() <= 8


def exif_rotated(source: Image.Image, path: Path, **save_options: object) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    source.save(path, exif=exif.tobytes(), **save_options)
    return path


def test_exif_orientation_is_applied_to_png_exactly(tmp_path: Path) -> None:
    stored = Image.new("RGB", (4, 2), BLUE)
    stored.putpixel((0, 0), RED)
    upright = load_rgb(exif_rotated(stored, tmp_path / "rotated.png"))
    assert upright.size == (2, 4)
    assert upright.getpixel((1, 0)) == RED  # stored top-left ends up top-right after a clockwise turn
    assert upright.getpixel((0, 0)) == BLUE


def test_exif_orientation_is_applied_to_jpeg(tmp_path: Path) -> None:
    stored = Image.new("RGB", (64, 32), BLUE)
    stored.paste(RED, (0, 0, 32, 32))  # left half red
    upright = load_rgb(exif_rotated(stored, tmp_path / "rotated.jpg", quality=95))
    assert upright.size == (32, 64)
    top, bottom = np.array(upright.getpixel((16, 8))), np.array(upright.getpixel((16, 56)))
    assert np.abs(top - np.array(RED)).max() < 30 and np.abs(bottom - np.array(BLUE)).max() < 30


def test_huge_jpeg_is_decoded_reduced_and_huge_png_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (256, 192), (0, 128, 0)).save(tmp_path / "huge.jpg")
    Image.new("RGB", (256, 192), (0, 128, 0)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 256x192 is now a "decompression bomb"
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "huge.jpg")

    reduced = load_rgb(tmp_path / "huge.jpg", min_side=16)
    assert reduced.size == (32, 24)  # JPEG draft decoded at 1/8 scale: the short side still covers 16 px
    assert np.abs(np.array(reduced.getpixel((16, 12))) - np.array((0, 128, 0))).max() <= 4
    with pytest.raises(BadImage, match=r"huge\.png.*decompression-bomb"):
        load_rgb(tmp_path / "huge.png")
    assert Image.MAX_IMAGE_PIXELS == 1000  # the temporary override was restored


def test_min_side_keeps_enough_resolution(tmp_path: Path) -> None:
    Image.new("RGB", (400, 300)).save(tmp_path / "photo.jpg")
    assert load_rgb(tmp_path / "photo.jpg", min_side=64).size == (100, 75)  # 1/4 scale; 1/8 would be < 64
    assert load_rgb(tmp_path / "photo.jpg").size == (400, 300)


def test_bytes_and_file_objects_are_accepted(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), RED).save(buffer, format="PNG")
    assert first_row(load_rgb(buffer.getvalue())) == [RED, RED]
    buffer.seek(0)
    assert first_row(load_rgb(buffer)) == [RED, RED]


def test_unreadable_images_raise_bad_image_naming_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), RED).save(tmp_path / "whole.jpg")
    encoded = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(encoded[: len(encoded) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x00\xffnot an image at all" * 8)
    for name in ("truncated.jpg", "garbage.png", "missing.png"):
        with pytest.raises(BadImage, match=name):
            load_rgb(tmp_path / name)


def test_to_tensor_center_crops_the_middle_of_a_wide_image() -> None:
    wide = Image.new("RGB", (96, 32), RED)
    wide.paste(BLUE, (32, 0, 64, 32))  # red | blue | red thirds
    pixels = to_tensor(wide, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[:, :, 4:12], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 16, 8))


def test_to_tensor_without_crop_squashes_the_whole_image() -> None:
    wide = Image.new("RGB", (96, 32), RED)
    wide.paste(BLUE, (32, 0, 64, 32))
    pixels = to_tensor(wide, 12, center_crop=False)
    assert pixels.shape == (3, 12, 12)
    assert pixels[0, 6, 0] == 1.0 and pixels[2, 6, 6] == 1.0 and pixels[0, 6, 11] == 1.0


def test_to_tensor_flip_mirrors_and_tiny_images_upscale() -> None:
    image = Image.new("RGB", (2, 2), RED)
    image.putpixel((0, 0), BLUE)
    image.putpixel((0, 1), BLUE)
    plain, flipped = to_tensor(image, 8), to_tensor(image, 8, flip=True)
    assert torch.equal(flipped, plain.flip(-1))
    assert plain.min() >= 0.0 and plain.max() <= 1.0
    one_pixel = to_tensor(load_rgb(Image.new("L", (1, 1), 51)), 32)
    assert torch.allclose(one_pixel, torch.full((3, 32, 32), 0.2))


def test_to_tensor_requires_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("L", (4, 4)), 4)
