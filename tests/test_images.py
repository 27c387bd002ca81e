"""dfnet.images: the one decoder (modes, transparency, EXIF, limits) and PNG encoder."""

import io

import numpy as np
import pytest
from PIL import Image

from dfnet.images import (
    ImageTooLarge,
    UnreadableImage,
    decode_image,
    encode_png,
    is_image_file,
)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_modes_are_reduced_to_l_rgb_rgba() -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    assert decode_image(encode(Image.fromarray(rgba, "RGBA"))).shape == (5, 7, 4)
    palette = Image.new("P", (4, 3))
    palette.info["transparency"] = 0
    assert decode_image(encode(palette)).shape == (3, 4, 4)  # a transparent palette keeps alpha
    assert decode_image(encode(Image.new("LA", (4, 3)))).shape == (3, 4, 4)
    assert decode_image(encode(Image.new("1", (4, 3)))).shape == (3, 4)
    assert decode_image(encode(Image.new("CMYK", (4, 3)), "JPEG")).shape == (3, 4, 3)
    # 16-bit grey is rescaled, not clipped: mid-grey stays mid-grey.
    grey16 = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    assert decode_image(encode(grey16)).tolist() == [[128, 128], [128, 128]]


def test_rgb_composites_alpha_over_white() -> None:
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)  # transparent black
    pixels[0, 0] = (10, 20, 30, 255)
    rgb = decode_image(encode(Image.fromarray(pixels, "RGBA")), mode="RGB")
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[1, 1].tolist() == [255, 255, 255]
    assert decode_image(encode(Image.new("L", (3, 2), 7)), mode="RGB").shape == (2, 3, 3)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    assert decode_image(encode(Image.new("RGB", (8, 6)), "JPEG", exif=exif)).shape == (8, 6, 3)


@pytest.mark.parametrize(
    "data",
    [b"", b"plain text", encode(Image.new("RGB", (64, 64)))[:60]],
    ids=["empty", "text", "truncated"],
)
def test_unreadable_data_raises(data: bytes) -> None:
    with pytest.raises(UnreadableImage):
        decode_image(data)


def test_limits_and_formats() -> None:
    with pytest.raises(ImageTooLarge, match="exceeds the limit of 50"):
        decode_image(encode(Image.new("RGB", (10, 10))), max_pixels=50)
    with pytest.raises(UnreadableImage, match="not a PNG/JPEG image"):
        decode_image(encode(Image.new("RGB", (4, 4)), "GIF"), formats=("PNG", "JPEG"))


@pytest.mark.parametrize("fast", [False, True])
def test_png_round_trip(fast: bool) -> None:
    for shape in [(5, 6), (5, 6, 3), (5, 6, 4)]:
        array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(decode_image(encode_png(array, fast=fast)), array)
        np.testing.assert_array_equal(decode_image(encode_png(Image.fromarray(array), fast=fast)), array)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2), dtype=np.float32), fast=fast)
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((2, 2, 2), dtype=np.uint8), fast=fast)
    with pytest.raises(ValueError, match="mode P"):
        encode_png(Image.new("P", (2, 2)), fast=fast)


def test_image_extensions() -> None:
    assert is_image_file("a/b/Photo.JPG") and is_image_file("x.webp")
    assert not is_image_file("notes.txt") and not is_image_file(".hidden.png")
