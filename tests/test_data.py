"""dfnet.data: stored photos, crops, splits, Parquet shards and training-time mask sampling."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from dfnet import data, storage
from dfnet.masks import mask_pool


def _encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kwargs) -> bytes:
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- stored photos --------------------------------------------------------------------------
# The decoder itself (modes, EXIF, limits) is tested in test_images.py.


def test_decode_photo_gives_rgb_with_transparency_over_white():
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[:, :5] = (10, 20, 30, 255)  # opaque left half keeps its colour
    rgba[:, 5:] = (200, 0, 0, 0)  # transparent right half: the hidden red must not show
    decoded = data.decode_photo(_encode(rgba))
    assert decoded.shape == (8, 10, 3)
    assert np.all(decoded[:, :5] == (10, 20, 30)) and np.all(decoded[:, 5:] == 255)
    assert data.decode_photo(_encode(np.zeros((6, 10), np.uint8))).shape == (6, 10, 3)
    with pytest.raises(ValueError):
        data.decode_photo(_encode(_noise(64, 64), fmt="JPEG")[:600])  # truncated


def test_photo_source_rows_key_split_and_store_every_file():
    source = data.PhotoSource(store_short_side=16, val_fraction=0.3, test_fraction=0.3, root="/photos")
    row = source.row("/photos/sub/a.png", _encode(_noise(40, 20)))
    assert row["key"] == row["source"] == "sub/a.png" and row["error"] == ""
    assert row["split"] == data.split_of("sub/a.png", 0.3, 0.3)
    assert (row["height"], row["width"]) == (32, 16) == data.decode_photo(row["image"]).shape[:2]
    small = source.row("/photos/b.png", _encode(_noise(8, 12)))  # never scaled up
    assert (small["height"], small["width"]) == (8, 12)
    bad = source.row("/photos/c.png", b"not an image")
    assert bad["image"] == b"" and bad["error"]
    single = data.PhotoSource(16, 0.0, 0.0, root="/photos/one.png")  # the source names one file
    assert single.row("/photos/one.png", _encode(_noise(8, 8)))["key"] == "one.png"


# --- sample photos ----------------------------------------------------------------------------


def test_sample_photos_are_decodable_photographs():
    photos = data.sample_photos()
    assert len(photos) >= 10
    for key, path in photos.items():
        assert key.startswith(("skimage/", "sklearn/")) and path.is_file()
        image = data.decode_photo(path.read_bytes())
        assert image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) >= 256, key  # big enough for many distinct crops
        assert image.std() > 10, key  # not a flat synthetic image


# --- crops --------------------------------------------------------------------------------


def test_train_crop_size_flip_and_determinism():
    image = _noise(120, 200)
    crops = [data.train_crop(image, 32, np.random.default_rng(seed), 4.0)[0] for seed in range(6)]
    assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
    np.testing.assert_array_equal(crops[0], data.train_crop(image, 32, np.random.default_rng(0), 4.0)[0])
    assert len({c.tobytes() for c in crops}) == 6


def test_train_crop_windows_span_one_to_max_zoom_out_crop_sides():
    # Pixel value = x coordinate, so a crop's left-to-right value span measures its window
    # (flips make it negative): column centres of a 16-px crop of a window s lie 15/16 * s apart.
    ramp = np.broadcast_to(np.arange(250, dtype=np.uint8)[None, :, None], (300, 250, 3)).copy()
    spans = [
        abs(float(c[8, -1, 0]) - float(c[8, 0, 0]))
        for c, _ in (data.train_crop(ramp, 16, np.random.default_rng(s), max_zoom_out=4.0) for s in range(60))
    ]
    assert min(spans) >= 16 * 15 / 16 - 2 and max(spans) <= 64 * 15 / 16 + 2
    assert max(spans) - min(spans) > 20  # the scale varies from crop to crop
    flipped = [data.train_crop(ramp, 16, np.random.default_rng(s), 4.0)[0][8, 0, 0] > 100 for s in range(60)]
    assert 10 < sum(flipped) < 50  # left-right flips, about half of the time


def test_train_crop_of_a_photo_smaller_than_the_crop_upscales_it():
    crop, share = data.train_crop(_noise(10, 14), 48, np.random.default_rng(0), 4.0)
    assert crop.shape == (48, 48, 3) and share == 1.0


@pytest.mark.parametrize(("shape", "expected"), [((100, 300), (64, 192)), ((300, 100), (192, 64))])
def test_resize_short_side_keeps_the_aspect(shape, expected):
    assert data.resize_short_side(_noise(*shape), 64).shape == (*expected, 3)
    small = _noise(20, 30)
    assert data.resize_short_side(small, 64, upscale=False) is small


def test_split_of_is_deterministic_across_processes():
    keys = [f"photos/{i:04d}.jpg" for i in range(50)]
    here = [data.split_of(k, 0.2, 0.2) for k in keys]
    assert here == [data.split_of(k, 0.2, 0.2) for k in keys]
    code = f"from dfnet.data import split_of\nprint(','.join(split_of(k, 0.2, 0.2) for k in {keys!r}))"
    env = dict(os.environ, PYTHONHASHSEED="12345")  # Python's own hash() would change
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == here


def test_split_of_matches_fractions():
    keys = [f"dir/img_{i}.png" for i in range(1000)]
    counts = {s: 0 for s in storage.SPLITS}
    for key in keys:
        counts[data.split_of(key, 0.15, 0.25)] += 1
    assert abs(counts["val"] - 150) < 40
    assert abs(counts["test"] - 250) < 45
    assert counts["train"] == 1000 - counts["val"] - counts["test"]
    assert {data.split_of(k, 0.0, 0.0) for k in keys} == {"train"}
    with pytest.raises(ValueError):
        data.split_of("x", 0.7, 0.5)


def test_sample_quotas_fill_every_split_once():
    keys = list(data.sample_photos())
    splits = data.quota_splits(keys, 0.15, 0.15)
    assert set(splits) == set(keys)  # every photo gets exactly one split
    by_split = {s: [k for k, v in splits.items() if v == s] for s in storage.SPLITS}
    assert all(len(v) >= 1 for v in by_split.values())
    n = len(keys)
    assert len(by_split["test"]) == max(1, round(n * 0.15))
    assert len(by_split["val"]) == max(1, round(n * 0.15))
    assert splits == data.quota_splits(reversed(keys), 0.15, 0.15)  # order does not matter


def test_quotas_on_tiny_sets_keep_a_training_photo():
    assert sorted(data.quota_splits(["a", "b", "c"], 0.1, 0.1).values()) == ["test", "train", "val"]
    two = data.quota_splits(["a", "b"], 0.1, 0.1)
    assert "train" in two.values() and len(two) == 2
    assert set(data.quota_splits(["a", "b", "c"], 0.0, 0.1).values()) == {"train", "test"}


# --- masks at training time ---------------------------------------------------------------


def test_training_masks_are_augmented_pool_masks_with_holes():
    pool = mask_pool(12, 32, 32, seed=3)
    masks = np.stack([data.training_mask(pool, np.random.default_rng(seed), 32) for seed in range(20)])
    assert masks.shape == (20, 32, 32) and masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert all((m < 0.5).any() for m in masks)  # every training mask has a hole
    # The random affine warp is applied: most samples match no pool mask exactly.
    pool_set = {m.astype(np.float32).tobytes() for m in pool}
    assert sum(m.tobytes() not in pool_set for m in masks) >= 15
    np.testing.assert_array_equal(masks[0], data.training_mask(pool, np.random.default_rng(0), 32))


def _hole_depth(masks: list[np.ndarray]) -> float:
    """Median distance of hole pixels to the nearest known pixel: how wide holes are, in pixels
    (masks with no known pixel at all have no such distance and are left out)."""
    depths = [cv2.distanceTransform((m < 0.5).astype(np.uint8), cv2.DIST_L2, 5) for m in masks if m.any()]
    return float(np.median(np.concatenate([d[d > 0] for d in depths])))


def test_a_crop_showing_a_share_of_its_photo_gets_that_share_of_a_pool_mask():
    # A 64² crop that shows a quarter of its photo's short side must see holes four times as wide
    # (in its pixels) as one showing the whole short side: holes keep their whole-photo scale.
    pool = mask_pool(40, 128, 128, seed=5)
    whole = [data.training_mask(pool, np.random.default_rng(s), 64, share=1.0) for s in range(40)]
    quarter = [data.training_mask(pool, np.random.default_rng(s), 64, share=0.25) for s in range(40)]
    ratio = _hole_depth(quarter) / _hole_depth(whole)
    assert 2.5 < ratio < 6, ratio
    assert all(m.shape == (64, 64) for m in whole + quarter)
    with pytest.raises(ValueError, match="share"):
        data.training_mask(pool, np.random.default_rng(0), 64, share=1.5)
