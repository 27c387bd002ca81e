"""The project's one image decoder and PNG encoder, and its one list of image file extensions.

Every reader of untrusted image bytes (the prepare stage, the CLI, Serve) goes through
:func:`decode_image`, so every file is read the same way: EXIF orientation applied, the first
frame only, modes reduced to L, RGB or RGBA (``mode="RGB"`` composites alpha over white, as
viewers show it), and the header's pixel count checked before decoding, so a bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import PurePath
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageTooLarge",
    "UnreadableImage",
    "decode_image",
    "encode_png",
    "is_image_file",
    "open_image",
]

#: File extensions read wherever a folder or prefix of images is listed (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    "png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm",
)  # fmt: skip

#: Pillow's own decompression-bomb threshold: the limit when none is given.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

Mode = Literal["RGB", "RGBA", "L"]
_FAST_PNG = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH,
]  # fmt: skip
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImage(ValueError):
    """The bytes are not an image of an accepted format, or are truncated or corrupt."""


class ImageTooLarge(ValueError):
    """The image announces more pixels than the limit (found from the header, before decoding)."""


def is_image_file(path: str | PurePath) -> bool:
    """Whether `path` has one of :data:`IMAGE_EXTENSIONS` (hidden files never count)."""
    name = PurePath(path).name
    return not name.startswith(".") and name.lower().rpartition(".")[2] in IMAGE_EXTENSIONS


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Any Pillow mode → L, RGB or RGBA (see the module docstring)."""
    mode = image.mode
    if mode in ("L", "RGB", "RGBA"):
        return image.convert("RGBA") if "transparency" in image.info else image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            top = 65535.0
        elif mode == "I":  # 32-bit integer images are usually 16-bit data in a wider type
            top = 65535.0 if values.max(initial=0.0) > 255 else 255.0
        else:
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, ...


def open_image(
    data: bytes,
    *,
    mode: Mode | None = None,
    max_pixels: int | None = None,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Decode `data` to a Pillow image in mode L, RGB or RGBA (or `mode` when given).

    Raises ImageTooLarge when the header announces more than `max_pixels` (None: Pillow's
    limit), UnreadableImage for data that is empty, not one of `formats`, truncated or corrupt.
    """
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if not data:
        raise UnreadableImage("empty file")
    with warnings.catch_warnings():
        # The explicit check below is the limit; Pillow's softer warning zone adds nothing.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=formats)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(str(exc)) from None
        except UnidentifiedImageError:
            kinds = "/".join(formats) + " image" if formats else "recognised image format"
            raise UnreadableImage(f"not a {kinds}") from None
        except Exception as exc:  # Pillow raises many types (SyntaxError, struct.error, ...)
            raise UnreadableImage(f"unreadable image ({type(exc).__name__}: {exc})") from None
        width, height = image.size
        if width * height > limit:
            raise ImageTooLarge(f"{width}×{height} = {width * height} pixels exceeds the limit of {limit}")
        if width == 0 or height == 0:
            raise UnreadableImage("image has no pixels")
        try:
            image.load()  # open() reads the header only: truncation and corruption show here
            image = _normalise_mode(ImageOps.exif_transpose(image))
        except Exception as exc:
            raise UnreadableImage(f"truncated or corrupt image ({type(exc).__name__}: {exc})") from None
    if mode == "RGB" and image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert(mode) if mode and image.mode != mode else image


def decode_image(
    data: bytes,
    *,
    mode: Mode | None = None,
    max_pixels: int | None = None,
    formats: Sequence[str] | None = None,
) -> np.ndarray:
    """:func:`open_image` as a uint8 array: H×W for L, H×W×3 for RGB, H×W×4 for RGBA."""
    return np.asarray(open_image(data, mode=mode, max_pixels=max_pixels, formats=formats))


def encode_png(image: np.ndarray | Image.Image, *, fast: bool = False) -> bytes:
    """PNG bytes of a uint8 H×W, H×W×3 or H×W×4 array (or an L, RGB or RGBA Pillow image);
    deterministic.

    `fast` is for answers whose encoding time counts (Serve): light compression and one filter
    through OpenCV, larger files. The default favours size, for stored data.
    """

    if isinstance(image, Image.Image) and image.mode not in ("L", "RGB", "RGBA"):
        raise ValueError(f"encode_png takes L, RGB or RGBA images, got mode {image.mode}")
    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"encode_png expects H×W, H×W×3 or H×W×4, got shape {array.shape}")
    if fast:
        if array.ndim == 3:  # OpenCV's channel order is BGR(A)
            array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
        encoded, data = cv2.imencode(".png", array, _FAST_PNG)
        if not encoded:
            raise ValueError(f"OpenCV could not encode a {array.shape} image as PNG")
        return data.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
