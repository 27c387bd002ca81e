"""Tests for dfnet.metrics against hand-computed values and independent implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from dfnet import metrics as Mt


def _square_hole(size: int, top: int, left: int, side: int, n: int = 1) -> torch.Tensor:
    """An (n, 1, size, size) mask, 1 = known, with a side x side hole at (top, left)."""
    mask = torch.ones(n, 1, size, size)
    mask[:, :, top : top + side, left : left + side] = 0
    return mask


# --- l1 ------------------------------------------------------------------------------------------


def test_l1_percent_hand_computed() -> None:
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    # Image 0: +0.1 on a 4x4 hole in all 3 channels -> 0.1 * 48 / 192 = 0.025 -> 2.5 %.
    pred[0, :, 2:6, 2:6] += 0.1
    # Image 1: one pixel of one channel off by 0.96 -> 0.96 / 192 = 0.005 -> 0.5 %.
    pred[1, 1, 0, 0] = 0.96
    result = Mt.l1_percent(pred, target)
    assert result.shape == (2,)
    assert result[0].item() == pytest.approx(2.5, rel=1e-5)
    assert result[1].item() == pytest.approx(0.5, rel=1e-5)
    # Symmetric in its arguments (absolute error).
    torch.testing.assert_close(Mt.l1_percent(target, pred), result)


def test_l1_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        Mt.l1_percent(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# --- boundary band and BPE ---------------------------------------------------------------------


def test_boundary_band_hand_counted() -> None:
    mask = _square_hole(8, 2, 2, 4)
    band1 = Mt.boundary_band(mask, 1)
    assert band1.shape == (1, 1, 8, 8)
    # Width 1: the ring of the 4x4 hole = 16 - 2x2 inner = 12 pixels, the inner 2x2 excluded.
    assert band1.sum().item() == 12
    assert band1[0, 0, 3:5, 3:5].sum().item() == 0
    assert band1[0, 0, 2, 2:6].sum().item() == 4
    # Width 2 reaches the centre of a 4x4 hole.
    assert Mt.boundary_band(mask, 2).sum().item() == 16
    # 8x8 hole in 12x12: width 1 -> 64 - 36, width 2 -> 64 - 16.
    big = _square_hole(12, 2, 2, 8)
    assert Mt.boundary_band(big, 1).sum().item() == 28
    assert Mt.boundary_band(big, 2).sum().item() == 48
    # Never outside the hole.
    assert (Mt.boundary_band(big, 3) * big).sum().item() == 0


def test_boundary_band_excludes_image_border() -> None:
    # 4x4 hole in the top-left corner of 8x8: only the row and column facing known pixels form
    # the band (4 + 4 - 1 = 7 pixels); the sides along the image frame do not.
    mask = _square_hole(8, 0, 0, 4)
    band = Mt.boundary_band(mask, 1)[0, 0]
    assert band.sum().item() == 7
    assert band[3, 0:4].sum().item() == 4 and band[0:4, 3].sum().item() == 4
    assert band[0, 0].item() == 0 and band[1, 1].item() == 0
    # A hole covering a whole border row still has no band along the frame.
    strip = torch.ones(1, 1, 6, 6)
    strip[:, :, 0:2, :] = 0
    band = Mt.boundary_band(strip, 1)[0, 0]
    assert band[1].sum().item() == 6 and band[0].sum().item() == 0


def test_boundary_band_matches_chessboard_distance_transform() -> None:
    rng = np.random.default_rng(0)
    for width in (1, 2, 4):
        for _ in range(5):
            holes = np.zeros((40, 48), dtype=bool)
            for _ in range(4):
                top, left = rng.integers(0, 36), rng.integers(0, 44)
                holes[top : top + rng.integers(3, 20), left : left + rng.integers(3, 20)] = True
            # Independent oracle: chessboard distance of each hole pixel to the nearest known one.
            distance = ndimage.distance_transform_cdt(holes, metric="chessboard")
            expected = holes & (distance <= width)
            mask = torch.from_numpy((~holes).astype(np.float32))[None, None]
            band = Mt.boundary_band(mask, width)[0, 0].numpy().astype(bool)
            np.testing.assert_array_equal(band, expected)


def test_boundary_band_rejects_bad_width() -> None:
    with pytest.raises(ValueError):
        Mt.boundary_band(_square_hole(8, 2, 2, 4), 0)


def test_bpe_hand_computed() -> None:
    mask = _square_hole(8, 2, 2, 4, n=2)
    target = torch.full((2, 3, 8, 8), 0.5)
    pred = target.clone()
    # Image 0: error 0.2 on the 12 band pixels, 0.4 on the inner 2x2, 0.3 on known pixels. Only
    # the band counts: BPE = 0.2 -> 20 %.
    pred[0] += 0.3 * mask[0]
    pred[0, :, 2:6, 2:6] = 0.7
    pred[0, :, 3:5, 3:5] = 0.1
    # Image 1: error 0.06 in channel 0 only on the band -> 0.06 * 12 / (12 * 3) = 0.02 -> 2 %.
    pred[1, 0, 2:6, 2:6] += 0.06
    pred[1, 0, 3:5, 3:5] = 0.5
    result = Mt.bpe(pred, target, mask, band_width=1)
    assert result.shape == (2,)
    assert result[0].item() == pytest.approx(20.0, rel=1e-5)
    assert result[1].item() == pytest.approx(2.0, rel=1e-5)
    # With width 2 the whole 4x4 hole is the band: (12 * 0.2 + 4 * 0.4) / 16 = 0.25 -> 25 %.
    assert Mt.bpe(pred, target, mask, band_width=2)[0].item() == pytest.approx(25.0, rel=1e-5)


def test_bpe_empty_band_is_nan() -> None:
    pred = torch.rand(2, 3, 8, 8)
    target = torch.rand(2, 3, 8, 8)
    mask = torch.ones(2, 1, 8, 8)  # image 0: no hole at all
    mask[1] = 0  # image 1: all hole, no known pixel to border on
    result = Mt.bpe(pred, target, mask, band_width=1)
    assert torch.isnan(result).all()


def test_band_width_for() -> None:
    assert Mt.band_width_for(256, 256, 5) == 5
    assert Mt.band_width_for(512, 512, 5) == 10
    assert Mt.band_width_for(512, 384, 5) == 8  # 5 * 384 / 256 = 7.5
    assert Mt.band_width_for(64, 64, 5) == 1
    assert Mt.band_width_for(16, 16, 5) == 1  # never 0


# --- PSNR and SSIM ------------------------------------------------------------------------------


def test_psnr_known_mse() -> None:
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1, :, :4] = 0.2  # half the pixels off by 0.2 -> MSE 0.02 -> 10 log10(50)
    result = Mt.psnr(pred, target)
    assert result[0].item() == pytest.approx(20.0, rel=1e-5)
    assert result[1].item() == pytest.approx(10 * math.log10(50), rel=1e-5)


def test_identical_images() -> None:
    image = torch.rand(2, 3, 16, 20)
    assert torch.isinf(Mt.psnr(image, image.clone())).all()
    torch.testing.assert_close(Mt.ssim(image, image.clone()), torch.ones(2))


def _structured_pair(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = ndimage.gaussian_filter(rng.random((height, width, 3)), sigma=(2, 2, 0))
    noisy = np.clip(base + 0.08 * rng.standard_normal(base.shape), 0, 1)
    return np.stack([base, noisy])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_matches_skimage(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    pairs = [_structured_pair(rng, 32, 45), _structured_pair(rng, 32, 45)]
    pairs.append(np.stack([rng.random((32, 45, 3)), rng.random((32, 45, 3))]))
    expected = [
        structural_similarity(
            a,
            b,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=2,
        )
        for a, b in pairs
    ]
    pred = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).to(dtype)
    target = torch.from_numpy(np.stack([p[1] for p in pairs])).permute(0, 3, 1, 2).to(dtype)
    result = Mt.ssim(pred, target)
    assert result.shape == (3,)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(result.double().numpy(), expected, atol=tol)
    # The cases really differ (random pair far from the structured ones).
    assert expected[2] < 0.2 < expected[0]


def test_ssim_hand_computed_on_flat_images() -> None:
    """Flat images have no variance: SSIM is the luminance term (2 μx μy + C1) / (μx² + μy² + C1)
    with C1 = (0.01 · data range 1)²."""
    c1 = 0.01**2
    pred, target = (
        torch.full((1, 3, 16, 16), 0.2, dtype=torch.float64),
        torch.full((1, 3, 16, 16), 0.6, dtype=torch.float64),
    )
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert Mt.ssim(pred, target).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_is_symmetric_per_channel_mean_and_falls_with_noise() -> None:
    rng = np.random.default_rng(3)
    base = torch.from_numpy(ndimage.gaussian_filter(rng.random((3, 32, 32)), sigma=(0, 2, 2)))[None]
    noise = torch.from_numpy(rng.standard_normal((1, 3, 32, 32)))
    scores = [Mt.ssim((base + level * noise).clamp(0, 1), base).item() for level in (0.02, 0.05, 0.1, 0.2)]
    assert all(-1 <= s < 1 for s in scores) and scores == sorted(scores, reverse=True)
    noisy = (base + 0.05 * noise).clamp(0, 1)
    torch.testing.assert_close(Mt.ssim(noisy, base), Mt.ssim(base, noisy), rtol=0, atol=1e-12)
    per_channel = [Mt.ssim(noisy[:, c : c + 1], base[:, c : c + 1]) for c in range(3)]
    torch.testing.assert_close(Mt.ssim(noisy, base), sum(per_channel) / 3, rtol=0, atol=1e-12)


def test_ssim_rejects_tiny_images() -> None:
    with pytest.raises(ValueError):
        Mt.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
