"""Tests for dfnet.masks: stroke masks, bins, augmentation, storage and user mask conversion."""

from __future__ import annotations

import io

import numpy as np
import pytest

from dfnet import masks as M

SIZES = [(256, 256), (512, 384), (64, 64)]


def _is_binary(array: np.ndarray) -> bool:
    return bool(np.all((array == 0) | (array == 1)))


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_free_form_mask_shape_binary_and_has_holes(height: int, width: int) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = M.free_form_mask(height, width, rng)
        assert mask.shape == (height, width)
        assert mask.dtype == np.uint8
        assert _is_binary(mask)
        assert 0.0 < M.hole_ratio(mask) < 1.0


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_free_form_mask_seeded(height: int, width: int) -> None:
    a = M.free_form_mask(height, width, np.random.default_rng(7))
    b = M.free_form_mask(height, width, np.random.default_rng(7))
    c = M.free_form_mask(height, width, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_free_form_brush_scales_with_resolution() -> None:
    # Same random draws at 2x the size: the hole *fraction* should stay comparable, which only
    # holds when brush width and segment length both scale with the image.
    def mean_ratio(size: int) -> float:
        rng = np.random.default_rng(0)
        return float(np.mean([M.hole_ratio(M.free_form_mask(size, size, rng)) for _ in range(60)]))

    small, large = mean_ratio(256), mean_ratio(512)
    assert small > 0.02
    assert 0.6 < large / small < 1.6


def test_hole_ratio_counts_zeros() -> None:
    mask = np.ones((4, 5), dtype=np.uint8)
    mask[0, :3] = 0
    assert M.hole_ratio(mask) == pytest.approx(3 / 20)
    assert M.hole_ratio(np.ones((3, 3))) == 0.0
    assert M.hole_ratio(np.zeros((3, 3), dtype=np.float32)) == 1.0


def test_bin_index() -> None:
    assert M.bin_index(0.0) == 0
    assert M.bin_index(0.05) == 0
    assert M.bin_index(0.1) == 1
    assert M.bin_index(0.4999) == 4
    assert M.bin_index(0.5) is None
    assert M.bin_index(0.9) is None
    assert len(M.HOLE_BINS) == 5


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_evaluation_masks_fill_their_bins(height: int, width: int) -> None:
    count = 6
    by_bin = M.evaluation_masks(count, height, width, seed=11)
    assert sorted(by_bin) == list(range(len(M.HOLE_BINS)))
    for index, masks in by_bin.items():
        lo, hi = M.HOLE_BINS[index]
        assert masks.shape == (count, height, width)
        assert masks.dtype == np.uint8
        assert _is_binary(masks)
        for mask in masks:
            ratio = M.hole_ratio(mask)
            assert lo <= ratio < hi
            assert ratio > 0.0
            assert M.bin_index(ratio) == index


def test_evaluation_masks_seeded_and_distinct() -> None:
    a = M.evaluation_masks(3, 64, 64, seed=5)
    b = M.evaluation_masks(3, 64, 64, seed=5)
    c = M.evaluation_masks(3, 64, 64, seed=6)
    for index in a:
        np.testing.assert_array_equal(a[index], b[index])
        assert not np.array_equal(a[index], c[index])
        # Masks within a bin are not copies of each other.
        assert not np.array_equal(a[index][0], a[index][1])


def test_mask_pool_spread() -> None:
    pool = M.mask_pool(120, 128, 128, seed=1)
    assert pool.shape == (120, 128, 128)
    assert pool.dtype == np.uint8
    assert _is_binary(pool)
    ratios = np.array([M.hole_ratio(m) for m in pool])
    assert ratios.min() > 0.0
    assert ratios.max() < 0.6
    # Spread over the range rather than clustered: every 0.1-wide band is represented.
    counts = np.histogram(ratios, bins=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])[0]
    assert np.all(counts >= 5), counts
    np.testing.assert_array_equal(pool, M.mask_pool(120, 128, 128, seed=1))


def test_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(0)
    # 5*7*9 = 315 bits: not a multiple of 8, so the padding of the last byte is exercised.
    masks = rng.integers(0, 2, size=(5, 7, 9), dtype=np.uint8)
    packed = M.pack_masks(masks)
    assert packed.dtype == np.uint8
    assert packed.size == (masks.size + 7) // 8
    restored = M.unpack_masks(packed, masks.shape)
    assert restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, masks)


def test_pack_rejects_non_binary() -> None:
    with pytest.raises(ValueError):
        M.pack_masks(np.array([[0, 2]], dtype=np.uint8))


def test_save_load_round_trip(tmp_path) -> None:
    pool = M.mask_pool(4, 32, 48, seed=2)
    evaluation = M.evaluation_masks(2, 32, 48, seed=3)[2]
    path = tmp_path / "masks.npz"
    M.save_masks(path, {"pool": pool, "eval/bin2": evaluation})
    assert path.exists()
    # Stored bit-packed: far smaller than one byte per pixel.
    assert path.stat().st_size < (pool.size + evaluation.size) / 4
    loaded = M.load_masks(path)
    assert set(loaded) == {"pool", "eval/bin2"}
    np.testing.assert_array_equal(loaded["pool"], pool)
    np.testing.assert_array_equal(loaded["eval/bin2"], evaluation)
    assert loaded["pool"].dtype == np.uint8


def test_save_load_file_object_and_exact_path(tmp_path) -> None:
    masks = M.mask_pool(2, 16, 16, seed=4)
    buffer = io.BytesIO()
    M.save_masks(buffer, {"m": masks})
    buffer.seek(0)
    np.testing.assert_array_equal(M.load_masks(buffer)["m"], masks)
    # A path without the .npz suffix is used exactly as given.
    path = tmp_path / "masks.bin"
    M.save_masks(path, {"m": masks})
    assert path.exists()
    np.testing.assert_array_equal(M.load_masks(path)["m"], masks)


def test_random_affine_binary_changed_and_seeded() -> None:
    mask = M.free_form_mask(128, 128, np.random.default_rng(0))
    out = M.random_affine(mask, np.random.default_rng(1))
    assert out.shape == mask.shape
    assert out.dtype == mask.dtype
    assert _is_binary(out)
    assert not np.array_equal(out, mask)
    assert M.hole_ratio(out) > 0.0
    np.testing.assert_array_equal(out, M.random_affine(mask, np.random.default_rng(1)))


def test_random_affine_identity_and_known_border() -> None:
    mask = M.free_form_mask(64, 80, np.random.default_rng(5))
    same = M.random_affine(
        mask,
        np.random.default_rng(0),
        max_rotation_deg=0.0,
        scale=(1.0, 1.0),
        max_translate=0.0,
        max_shear_deg=0.0,
    )
    np.testing.assert_array_equal(same, mask)
    # An all-hole mask shrunk to half size: the area uncovered around it must be known (1).
    holes = np.zeros((64, 64), dtype=np.uint8)
    shrunk = M.random_affine(
        holes,
        np.random.default_rng(0),
        max_rotation_deg=0.0,
        scale=(0.5, 0.5),
        max_translate=0.0,
        max_shear_deg=0.0,
    )
    assert shrunk[0, 0] == 1 and shrunk[-1, -1] == 1
    assert shrunk[32, 32] == 0
    assert M.hole_ratio(shrunk) == pytest.approx(0.25, abs=0.05)


def test_random_affine_keeps_float_masks_binary() -> None:
    mask = M.free_form_mask(64, 64, np.random.default_rng(2)).astype(np.float32)
    out = M.random_affine(mask, np.random.default_rng(3))
    assert out.dtype == np.float32
    assert _is_binary(out)


def _example_image() -> np.ndarray:
    """A grey image whose left half is white (255) and right half black, with mid-grey edges."""
    image = np.zeros((4, 6), dtype=np.uint8)
    image[:, :3] = 255
    image[0, 0] = 128  # exactly the threshold: white
    image[0, 5] = 127  # just below: black
    return image


def test_mask_from_image_grey_conventions() -> None:
    image = _example_image()
    white = image >= 128
    hole_white = M.mask_from_image(image, "hole-white")
    known_white = M.mask_from_image(image, "known-white")
    assert hole_white.dtype == np.uint8 and hole_white.shape == image.shape
    np.testing.assert_array_equal(hole_white, (~white).astype(np.uint8))
    np.testing.assert_array_equal(known_white, white.astype(np.uint8))
    # The same picture read the other way round gives the complementary mask.
    np.testing.assert_array_equal(hole_white + known_white, np.ones_like(image))


def test_mask_from_image_rgb_and_rgba() -> None:
    grey = _example_image()
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    expected = (grey < 128).astype(np.uint8)
    np.testing.assert_array_equal(M.mask_from_image(rgb, "hole-white"), expected)
    np.testing.assert_array_equal(M.mask_from_image(rgb, "known-white"), 1 - expected)
    # Alpha is ignored: a fully transparent channel must not change anything.
    rgba = np.concatenate([rgb, np.zeros((4, 6, 1), dtype=np.uint8)], axis=2)
    np.testing.assert_array_equal(M.mask_from_image(rgba, "hole-white"), expected)
    # Pure red has luminance 0.299*255 = 76 < 128: black, i.e. known under hole-white.
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    np.testing.assert_array_equal(M.mask_from_image(red, "hole-white"), np.ones((2, 2)))


def test_mask_from_image_errors() -> None:
    image = _example_image()
    with pytest.raises(ValueError, match="hole-white"):
        M.mask_from_image(image, "white-is-hole")
    with pytest.raises(ValueError):
        M.mask_from_image(np.zeros((4, 4, 2), dtype=np.uint8), "hole-white")
    with pytest.raises(ValueError):
        M.mask_from_image(np.zeros((4, 4), dtype=np.float32), "hole-white")
