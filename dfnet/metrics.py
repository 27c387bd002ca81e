"""Image-completion metrics: l1, BPE, PSNR and SSIM (paper section 4.2; its FID needs far more
photos per hole-size bin than the evaluation here has, so it is not computed).

Images are ``(N, C, H, W)`` floats in [0, 1], masks ``(N, 1, H, W)`` with 1 = known; each metric
returns one value per image so callers can group them (e.g. by hole-ratio bin). l1 and BPE are in
percent, the paper's l1 scale; its BPE scale is unpublished, so BPE is not comparable with Table 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

__all__ = [
    "band_width_for",
    "boundary_band",
    "bpe",
    "l1_percent",
    "psnr",
    "ssim",
]


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"expected two NCHW tensors of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def l1_percent(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error over all pixels and channels, x100 (percent of [0, 1]).

    The paper's l1 compares the completed image (known pixels pasted back) with the ground
    truth over the whole image.
    """
    _check_pair(pred, target)
    return (pred - target).abs().flatten(1).mean(1) * 100.0


def boundary_band(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width``-pixel band inside the hole along its boundary, as an ``(N, 1, H, W)`` 0/1 mask.

    Hole pixels within chessboard distance ``width`` of a known pixel, as one max-pool; the image
    border does not count as known, so holes touching the frame get no band along it.
    """
    if width < 1:
        raise ValueError(f"band width must be >= 1, got {width}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected an (N, 1, H, W) mask, got {tuple(mask.shape)}")
    known = (mask > 0.5).to(torch.float32)
    near_known = F.max_pool2d(known, kernel_size=2 * width + 1, stride=1, padding=width)
    return near_known * (1.0 - known)


def band_width_for(height: int, width: int, width_at_256: int) -> int:
    """BPE band width for an image size: `width_at_256` px (params.yaml's `evaluate.band_width`;
    the paper does not publish its n) at a 256 px short side, scaled with it, at least 1."""
    return max(1, round(width_at_256 * min(height, width) / 256))


def bpe(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, band_width: int) -> torch.Tensor:
    """Boundary Pixels Error per image: ``||b * (I - I_hat)||_1 / ||b||_1`` x100, ``b`` the
    :func:`boundary_band`. Images whose band is empty (no hole, or no known pixel) give NaN.
    """
    _check_pair(pred, target)
    if mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(pred.shape)}")
    band = boundary_band(mask, band_width).to(pred.dtype)
    error = ((pred - target).abs() * band).sum(dim=(1, 2, 3))
    weight = band.sum(dim=(1, 2, 3)) * pred.shape[1]
    # 0/0 -> NaN on purpose: an empty band has no defined error.
    return error / weight * 100.0


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1 (``inf`` for identical images)."""
    _check_pair(pred, target)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), data range 1, per channel and averaged: scikit-image's
    `structural_similarity` with Wang et al.'s Gaussian window, in float64. Images must be at
    least as large as the window (11×11).
    """

    _check_pair(pred, target)
    dtype = pred.dtype if pred.dtype in (torch.float32, torch.float64) else torch.float32
    x = pred.detach().to("cpu", torch.float64).numpy()
    y = target.detach().to("cpu", torch.float64).numpy()
    values = [
        structural_similarity(
            a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0
        )
        for a, b in zip(x, y)
    ]
    return torch.tensor(values, dtype=dtype, device=pred.device)
