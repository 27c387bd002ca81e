"""Free-form hole masks: generation, augmentation, hole-ratio bins and compact storage.

Convention everywhere in ``dfnet``: a mask is a ``uint8`` array with **1 = known pixel,
0 = hole**; user-facing mask images are converted at the boundary by :func:`mask_from_image`.
Strokes follow the spec's DeepFill v2 recipe, with lengths and brush widths that scale with the
image, so a mask looks alike at every photo size.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from typing import BinaryIO

import cv2
import numpy as np

__all__ = [
    "HOLE_BINS",
    "MASK_CONVENTIONS",
    "bin_index",
    "evaluation_masks",
    "free_form_mask",
    "hole_ratio",
    "load_masks",
    "mask_from_image",
    "mask_pool",
    "pack_masks",
    "random_affine",
    "save_masks",
    "unpack_masks",
]

#: Hole-ratio bins used for evaluation (paper Table 1): [lo, hi) fractions of hole pixels.
HOLE_BINS: tuple[tuple[float, float], ...] = (
    (0.0, 0.1),
    (0.1, 0.2),
    (0.2, 0.3),
    (0.3, 0.4),
    (0.4, 0.5),
)

#: Accepted conventions of :func:`mask_from_image`.
MASK_CONVENTIONS: tuple[str, ...] = ("hole-white", "known-white")
DEFAULT_MASK_CONVENTION = "hole-white"  # what most inpainting tools draw: white = fill

# Stroke parameters at the 256 px reference resolution (spec, "Training recipe").
_REFERENCE_SIZE = 256
_MIN_BRUSH = 12.0
_MAX_BRUSH = 40.0
_MEAN_ANGLE = 2.0 * math.pi / 5.0
_ANGLE_RANGE = 2.0 * math.pi / 15.0


def _draw_stroke(
    holes: np.ndarray,
    rng: np.random.Generator,
    min_vertices: int = 4,
    max_vertices: int = 11,
) -> None:
    """Draw one random brush stroke in place on ``holes`` (a uint8 canvas with 1 = hole)."""
    height, width = holes.shape
    diagonal = math.hypot(height, width)
    mean_length = diagonal / 8.0
    scale = min(height, width) / _REFERENCE_SIZE

    num_vertices = int(rng.integers(min_vertices, max_vertices + 1))
    # Each stroke gets its own angular spread, then turns alternate direction so the stroke
    # zig-zags instead of curling into a circle (the DeepFill v2 behaviour).
    angle_lo = _MEAN_ANGLE - rng.uniform(0.0, _ANGLE_RANGE)
    angle_hi = _MEAN_ANGLE + rng.uniform(0.0, _ANGLE_RANGE)
    brush = max(1, round(float(rng.uniform(_MIN_BRUSH, _MAX_BRUSH)) * scale))

    x = float(rng.uniform(0, width))
    y = float(rng.uniform(0, height))
    points = [(int(x), int(y))]
    # num_vertices counts all polyline vertices, so there are num_vertices - 1 segments.
    for i in range(num_vertices - 1):
        angle = rng.uniform(angle_lo, angle_hi)
        if i % 2 == 0:
            angle = 2.0 * math.pi - angle
        length = float(np.clip(rng.normal(mean_length, mean_length / 2.0), 0.0, 2.0 * mean_length))
        x = float(np.clip(x + length * math.cos(angle), 0, width - 1))
        y = float(np.clip(y + length * math.sin(angle), 0, height - 1))
        points.append((int(x), int(y)))

    radius = max(1, brush // 2)
    for start, end in itertools.pairwise(points):
        cv2.line(holes, start, end, color=1, thickness=brush, lineType=cv2.LINE_8)
    for point in points:
        cv2.circle(holes, point, radius, color=1, thickness=-1, lineType=cv2.LINE_8)


def _random_flip(holes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip left-right and/or top-bottom with probability 1/2 each (breaks the angle bias)."""
    if rng.random() < 0.5:
        holes = holes[:, ::-1]
    if rng.random() < 0.5:
        holes = holes[::-1, :]
    return np.ascontiguousarray(holes)


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")


def free_form_mask(
    height: int,
    width: int,
    rng: np.random.Generator,
    max_strokes: int = 4,
    min_vertices: int = 4,
    max_vertices: int = 11,
    flip: bool = True,
) -> np.ndarray:
    """Draw a DeepFill-v2-style free-form mask of 1..``max_strokes`` strokes.

    Returns a ``(height, width)`` uint8 array with 1 = known, 0 = hole. The result depends only
    on the state of ``rng``, so a generator seeded the same way gives the same mask.
    """
    _check_size(height, width)
    if max_strokes < 1 or not 2 <= min_vertices <= max_vertices:
        raise ValueError("need max_strokes >= 1 and 2 <= min_vertices <= max_vertices")
    holes = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        _draw_stroke(holes, rng, min_vertices, max_vertices)
    if flip:
        holes = _random_flip(holes, rng)
    return (1 - holes).astype(np.uint8)


def hole_ratio(mask: np.ndarray) -> float:
    """Fraction of hole pixels (value < 0.5) in a 1-known/0-hole mask."""
    mask = np.asarray(mask)
    if mask.size == 0:
        raise ValueError("empty mask")
    return float(np.count_nonzero(mask < 0.5)) / mask.size


def random_affine(
    mask: np.ndarray,
    rng: np.random.Generator,
    max_rotation_deg: float = 45.0,
    scale: tuple[float, float] = (0.8, 1.2),
    max_translate: float = 0.1,
    max_shear_deg: float = 10.0,
) -> np.ndarray:
    """Random rotation/scale/translation/shear of a mask about its centre (training augmentation).

    Nearest-neighbour sampling keeps the mask binary; pixels shifted in from outside the frame
    are *known* (1), so augmentation never invents holes along the border. ``max_translate`` is a
    fraction of the image size. Returns an array of the input's shape and dtype.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    height, width = mask.shape
    angle = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
    zoom = rng.uniform(scale[0], scale[1])
    shear = math.radians(rng.uniform(-max_shear_deg, max_shear_deg))
    tx = rng.uniform(-max_translate, max_translate) * width
    ty = rng.uniform(-max_translate, max_translate) * height

    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos_a, -sin_a], [sin_a, cos_a]])
    shear_m = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    linear = rotation @ shear_m * zoom
    # Map about the centre: p' = A (p - c) + c + t.
    offset = np.array([cx + tx, cy + ty]) - linear @ np.array([cx, cy])
    matrix = np.hstack([linear, offset[:, None]]).astype(np.float64)

    known = (mask >= 0.5).astype(np.uint8)
    warped = cv2.warpAffine(
        known,
        matrix,
        (width, height),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=1,
    )
    return warped.astype(mask.dtype, copy=False)


def bin_index(ratio: float) -> int | None:
    """Index of the :data:`HOLE_BINS` bin ``[lo, hi)`` containing ``ratio``, or None."""
    for index, (lo, hi) in enumerate(HOLE_BINS):
        if lo <= ratio < hi:
            return index
    return None


def _grow_mask(
    height: int,
    width: int,
    lo: float,
    hi: float,
    rng: np.random.Generator,
    max_overshoots: int = 20,
    max_restarts: int = 1000,
) -> np.ndarray:
    """A hole canvas (1 = hole) with hole ratio in ``[lo, hi)`` and > 0, built stroke by stroke.

    The target ratio is drawn uniformly so masks spread over the bin instead of piling up above
    ``lo``; strokes that overshoot ``hi`` are dropped, so high bins fill without rejecting whole
    masks.
    """
    area = height * width
    for _ in range(max_restarts):
        target = max(rng.uniform(lo, hi), 1.0 / area)
        holes = np.zeros((height, width), dtype=np.uint8)
        count = 0
        overshoots = 0
        while overshoots < max_overshoots:
            candidate = holes.copy()
            _draw_stroke(candidate, rng)
            new_count = int(np.count_nonzero(candidate))
            if new_count >= hi * area:
                overshoots += 1
                continue
            holes, count = candidate, new_count
            if count >= target * area:
                return holes
        # Stuck just below the target with strokes that are all too big: start over.
    raise RuntimeError(
        f"could not draw a {height}x{width} mask with hole ratio in [{lo}, {hi}); "
        "the image is probably too small for the brush"
    )


def evaluation_masks(count_per_bin: int, height: int, width: int, seed: int) -> dict[int, np.ndarray]:
    """Fixed evaluation masks per hole-ratio bin, fully determined by ``seed``.

    Returns ``{bin_index: (count_per_bin, height, width) uint8}``; every mask in bin ``i`` has a
    hole ratio in ``HOLE_BINS[i]`` (and > 0 for the lowest bin).
    """
    _check_size(height, width)
    if count_per_bin < 0:
        raise ValueError("count_per_bin must be >= 0")
    rng = np.random.default_rng(seed)
    result: dict[int, np.ndarray] = {}
    for index, (lo, hi) in enumerate(HOLE_BINS):
        masks = np.empty((count_per_bin, height, width), dtype=np.uint8)
        for i in range(count_per_bin):
            holes = _random_flip(_grow_mask(height, width, lo, hi, rng), rng)
            masks[i] = 1 - holes
        result[index] = masks
    return result


def mask_pool(count: int, height: int, width: int, seed: int, max_ratio: float = 0.6) -> np.ndarray:
    """The training mask pool: ``(count, height, width)`` uint8, 1 = known, 0 = hole.

    Hole ratios spread roughly uniformly over (0, ``max_ratio``); :func:`random_affine` augments
    them on the fly at training time.
    """
    _check_size(height, width)
    if count < 0:
        raise ValueError("count must be >= 0")
    if not 0.0 < max_ratio <= 1.0:
        raise ValueError("max_ratio must be in (0, 1]")
    rng = np.random.default_rng(seed)
    masks = np.empty((count, height, width), dtype=np.uint8)
    for i in range(count):
        holes = _random_flip(_grow_mask(height, width, 0.0, max_ratio, rng), rng)
        masks[i] = 1 - holes
    return masks


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Bit-pack a binary mask array of any shape into a flat uint8 array (8 pixels per byte)."""
    masks = np.asarray(masks)
    if masks.size and not np.all((masks == 0) | (masks == 1)):
        raise ValueError("pack_masks expects binary masks with values 0 and 1")
    return np.packbits(masks.astype(bool), axis=None)


def unpack_masks(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_masks`: a uint8 array of ``shape`` holding 0/1."""
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size * 8 < count:
        raise ValueError(f"{packed.size} packed bytes cannot hold {count} pixels")
    return np.unpackbits(packed, count=count).reshape(shape)


_BITS_SUFFIX = ".bits"
_SHAPE_SUFFIX = ".shape"


def save_masks(path: str | os.PathLike[str] | BinaryIO, masks_by_name: dict[str, np.ndarray]) -> None:
    """Store named binary mask arrays bit-packed in a compressed ``.npz`` (path or binary file).

    Each entry ``name`` becomes ``name.bits`` (packed bytes) and ``name.shape`` in the archive.
    The path is used exactly as given (numpy would otherwise append ``.npz``).
    """
    arrays: dict[str, np.ndarray] = {}
    for name, masks in masks_by_name.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"mask set names must be non-empty strings, got {name!r}")
        masks = np.asarray(masks)
        arrays[name + _BITS_SUFFIX] = pack_masks(masks)
        arrays[name + _SHAPE_SUFFIX] = np.asarray(masks.shape, dtype=np.int64)
    if hasattr(path, "write"):
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
        return
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with open(os.fspath(path), "wb") as handle:  # type: ignore[arg-type]
        handle.write(buffer.getvalue())


def load_masks(path: str | os.PathLike[str] | BinaryIO) -> dict[str, np.ndarray]:
    """Read what :func:`save_masks` wrote: ``{name: uint8 array of 0/1}``."""
    source = path if hasattr(path, "read") else os.fspath(path)  # type: ignore[arg-type]
    with np.load(source, allow_pickle=False) as archive:
        names = [k[: -len(_BITS_SUFFIX)] for k in archive.files if k.endswith(_BITS_SUFFIX)]
        result = {}
        for name in names:
            shape_key = name + _SHAPE_SUFFIX
            if shape_key not in archive.files:
                raise ValueError(f"mask archive lacks {shape_key!r}")
            result[name] = unpack_masks(archive[name + _BITS_SUFFIX], tuple(archive[shape_key]))
    return result


def mask_from_image(array: np.ndarray, convention: str) -> np.ndarray:
    """Convert a user-facing 8-bit mask image into the internal 1-known/0-hole uint8 mask.

    Colour is reduced to luminance (alpha ignored) and thresholded at mid grey; ``convention``
    says whether white is the hole (``"hole-white"``, most tools) or known (``"known-white"``).
    """

    if convention not in MASK_CONVENTIONS:
        raise ValueError(f"unknown mask convention {convention!r}; expected one of {', '.join(MASK_CONVENTIONS)}")
    image = np.asarray(array)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"expected an 8-bit mask image (integer values 0..255), got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        colour = image[:, :, :3].astype(np.float32)
        grey = colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif image.ndim == 2:
        grey = image.astype(np.float32)
    else:
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 mask image, got shape {image.shape}")
    white = grey >= 128
    known = ~white if convention == "hole-white" else white
    return known.astype(np.uint8)
