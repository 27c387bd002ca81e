"""Photos: the bundled sample photos, the stored JPEG codec, splits by photo, training crops and masks.

Everything here is plain numpy/Pillow/pyarrow so it can be used (and tested) without Ray;
``pipelines/prepare.py`` runs these functions inside Ray Data tasks.

Splits are decided per *source photo*: the prepared data hold whole photos, crops are drawn
from training photos only, and validation and test score other photos whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from dfnet.images import decode_image
from dfnet.masks import random_affine

__all__ = [
    "PhotoSource",
    "decode_photo",
    "encode_jpeg",
    "quota_splits",
    "resize_short_side",
    "sample_photos",
    "split_of",
    "stable_hash",
    "train_crop",
    "training_mask",
]

# Natural photographs only: drawn images, the motion-blur demo, thumbnails, retina.jpg (mostly
# border) and motorcycle_right (stereo twin of motorcycle_left: it would leak across splits) are
# left out. Grey photos are kept; decoding turns them into RGB.
_SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "hubble_deep_field.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png",
    "grass.png", "gravel.png",
)  # fmt: skip
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def sample_photos() -> dict[str, Path]:
    """The embedded default data set: ``{key: path}`` of photos bundled with installed packages.

    Keys look like ``"skimage/astronaut.png"`` so splits do not depend on the install location.
    Photos missing from an installed version are left out; at least one must exist.
    """
    found: dict[str, Path] = {}
    try:
        import skimage

        folder = Path(skimage.__file__).parent / "data"
        for name in _SKIMAGE_PHOTOS:
            if (folder / name).is_file():
                found[f"skimage/{name}"] = folder / name
    except ImportError:
        pass
    try:
        import sklearn

        folder = Path(sklearn.__file__).parent / "datasets" / "images"
        for name in _SKLEARN_PHOTOS:
            if (folder / name).is_file():
                found[f"sklearn/{name}"] = folder / name
    except ImportError:
        pass
    if not found:
        raise FileNotFoundError(
            "no sample photos found: install scikit-image and/or scikit-learn, "
            "or set data.source to a folder or s3:// prefix"
        )
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------
# Stored photos


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an ``HxWx3`` uint8 array: how prepared photos are stored (far smaller than
    PNG, and the source photos are JPEGs already)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_photo(data: bytes) -> np.ndarray:
    """A stored or source photo as ``HxWx3`` uint8 RGB through the one decoder
    (:func:`dfnet.images.decode_image`); raises ``ValueError`` when it is unreadable."""
    return decode_image(data, mode="RGB")


@dataclass(frozen=True)
class PhotoSource:
    """How the prepare stage names and splits the files of ``data.source`` and stores each one.

    Folder and S3 sources key a photo by its path relative to ``root`` and split it by a hash
    of that key (:func:`split_of`); the sample source gives its keys and quota splits.
    """

    store_short_side: int
    val_fraction: float
    test_fraction: float
    root: str = ""
    keys: dict[str, str] | None = None  # path -> key (sample source)
    splits: dict[str, str] | None = None  # key -> split (sample source)

    def key_of(self, path: str) -> str:
        if self.keys is not None:
            return self.keys[path]
        root = self.root.rstrip("/")
        if path == root:  # the source named a single file
            return posixpath.basename(path)
        return path[len(root) + 1 :] if root and path.startswith(root + "/") else path

    def split_of(self, key: str) -> str:
        """The split of photo ``key``: decided by its key alone, before it is read."""
        return self.splits[key] if self.splits is not None else split_of(key, self.val_fraction, self.test_fraction)

    def row(self, path: str, data: bytes) -> dict[str, Any]:
        """One file -> its row of :data:`PARQUET_SCHEMA` plus ``error``: the reason it is
        unreadable (and no image), or "" for a stored photo."""
        key = self.key_of(path)
        try:
            photo = resize_short_side(decode_photo(data), self.store_short_side, upscale=False)
        except ValueError as exc:
            return {"key": key, "source": key, "split": "", "image": b"", "height": 0, "width": 0, "error": str(exc)}
        return {"key": key, "source": key, "split": self.split_of(key), "image": encode_jpeg(photo),
                "height": photo.shape[0], "width": photo.shape[1], "error": ""}  # fmt: skip

    @classmethod
    def sample(cls, store_short_side: int, val_fraction: float, test_fraction: float) -> tuple[list[str], PhotoSource]:
        """The bundled sample photos' paths and their naming (quota splits: none left empty)."""
        photos = sample_photos()
        paths = [os.path.abspath(p) for p in photos.values()]
        splits = quota_splits(photos, val_fraction, test_fraction)
        return paths, cls(store_short_side, val_fraction, test_fraction, keys=dict(zip(paths, photos)), splits=splits)


# ---------------------------------------------------------------------------------------------
# Crops


def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def resize_short_side(image: np.ndarray, side: int, upscale: bool = True) -> np.ndarray:
    """``image`` (HxWx3 uint8) scaled so its short side is ``side``, aspect kept (antialiased).

    With ``upscale=False`` photos already smaller than ``side`` are returned unchanged.
    """
    if side < 1:
        raise ValueError("side must be >= 1")
    height, width = image.shape[:2]
    short = min(height, width)
    if short == side or (short < side and not upscale):
        return image
    scale = side / short
    size = (max(side, round(width * scale)), max(side, round(height * scale)))  # (W, H) for Pillow
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), dtype=np.uint8).copy()


def train_crop(image: np.ndarray, size: int, rng: np.random.Generator, max_zoom_out: float) -> tuple[np.ndarray, float]:
    """A fresh training crop: random scale, position and horizontal flip, resampled to ``size``².

    The window is ``size * z`` stored pixels wide, ``z`` uniform in ``[1, max_zoom_out]``: wider
    windows show more of a photo, nearer the whole photos the model completes. Also returns the
    window's share of the photo's short side, so :func:`training_mask` cuts at the same scale.
    """
    if size < 1 or max_zoom_out < 1.0:
        raise ValueError("need size >= 1 and max_zoom_out >= 1")
    height, width = image.shape[:2]
    short = min(height, width)
    side = min(short, size * float(rng.uniform(1.0, max_zoom_out))) if short >= size else short
    left = float(rng.uniform(0.0, width - side))
    top = float(rng.uniform(0.0, height - side))
    pil = Image.fromarray(np.ascontiguousarray(image))
    # Pillow's resize with a box resamples straight from the source window (antialiased).
    crop = pil.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.uint8).copy(), side / short


# ---------------------------------------------------------------------------------------------
# Splits


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"need val_fraction, test_fraction >= 0 with a sum <= 1, got {val_fraction}, {test_fraction}")


def _unit(key: str) -> float:
    return stable_hash(key) / 2.0**64


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for the source photo ``key``, from a stable hash.

    A photo's split never changes when other photos are added or removed, which is what large
    folder/S3 sources need.
    """
    _check_fractions(val_fraction, test_fraction)
    u = _unit(key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def quota_splits(keys: Iterable[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Splits for a *small, fixed* set of photos (the sample source) by quotas instead of chance.

    With a handful of photos, independent hash draws can leave val or test empty; quotas give
    each non-zero fraction at least one photo, in the order of :func:`split_of`'s hash.
    """
    _check_fractions(val_fraction, test_fraction)
    ordered = sorted(set(keys), key=lambda k: (_unit(k), k))
    n = len(ordered)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    # Keep at least one training photo: shrink val first, then test.
    while n_test + n_val > max(n - 1, 0) and (n_val or n_test):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    result = {}
    for index, key in enumerate(ordered):
        if index < n_test:
            result[key] = "test"
        elif index < n_test + n_val:
            result[key] = "val"
        else:
            result[key] = "train"
    return result


# ---------------------------------------------------------------------------------------------
# Masks at training time


def training_mask(
    pool: np.ndarray, rng: np.random.Generator, size: int, share: float = 1.0, max_tries: int = 5
) -> np.ndarray:
    """One ``size``² training mask, float32 with 1 = known: a random pool mask under the paper's
    random affine augmentation, cut at the crop's scale.

    A crop showing ``share`` of its photo's short side gets the same share of a pool mask, so its
    holes are as wide, relative to the content, as in a whole photo; a fixed pixel cut would
    train on holes much thinner than the evaluation's.
    """

    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    base = pool[int(rng.integers(0, pool.shape[0]))]
    has_hole = bool(np.any(base < 0.5))
    side = max(1, round(share * min(base.shape)))
    mask = base
    for _ in range(max_tries):
        warped = random_affine(base, rng)
        top = int(rng.integers(0, base.shape[0] - side + 1))
        left = int(rng.integers(0, base.shape[1] - side + 1))
        mask = cv2.resize(warped[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_NEAREST)
        # The warp or the cut can leave no hole; a hole-free mask teaches nothing about
        # completion, so draw again (and keep the last draw if all fail).
        if not has_hole or np.any(mask < 0.5):
            break
    return (mask >= 0.5).astype(np.float32)
