"""Image-completion metrics: l1, BPE, PSNR, SSIM and FID (paper section 4.2).

Conventions: images are float tensors ``(N, C, H, W)`` in [0, 1]; masks are ``(N, 1, H, W)``
with 1 = known pixel, 0 = hole. Per-image metrics return a tensor of shape ``(N,)`` so callers
can average over any grouping (e.g. hole-ratio bins) themselves.

l1 and BPE are reported in percent of the [0, 1] range (x100), the scale of the paper's l1
numbers. The paper does not say how its BPE numbers were scaled (they are smaller than its l1
numbers, which a mean over a band inside the hole would not be), so BPE values here are not
directly comparable with Table 1; the scale chosen here is stated with every BPE value.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

__all__ = [
    "FIDResult",
    "band_width_for",
    "boundary_band",
    "bpe",
    "fid",
    "fid_from_features",
    "frechet_distance",
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

    A hole pixel belongs to the band when its chessboard (Chebyshev, 8-connected) distance to the
    nearest known pixel is <= ``width``; this is a dilation of the known region by a
    ``(2*width+1)`` square, done as one max-pool. The pooling pads with -inf, so the image border
    is not treated as known: holes touching the frame get no band along it.
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
    """Boundary Pixels Error per image: ``||b * (I - I_hat)||_1 / ||b||_1`` x100.

    ``b`` is :func:`boundary_band` broadcast over the channels, so this is the mean absolute
    error over band pixels and channels, in percent of the [0, 1] range like :func:`l1_percent`
    (the paper's own BPE scale is unpublished). Images whose band is empty (no hole, or no known
    pixel) give NaN. :func:`band_width_for` scales the band with the image size.
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


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device):
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    window = torch.exp(-0.5 * (coords / sigma) ** 2)
    return (window / window.sum()).to(dtype=dtype, device=device)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), data range 1, per channel and averaged: the mean of
    scikit-image's `structural_similarity` with the paper's 11×11 Gaussian window (sigma 1.5) and
    population covariances. Images must be at least 11×11.
    """
    _check_pair(pred, target)
    # Half precision loses too much in the variance terms (differences of squares).
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


def _ssim_before(
    pred: torch.Tensor,
    target: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, data range 1.

    Computed per channel and averaged. Local statistics use a separable normalised Gaussian
    (11x11, sigma 1.5) over *valid* positions only (no padding), which equals the mean SSIM of
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)`` since skimage crops the padded border.
    """
    _check_pair(pred, target)
    if min(pred.shape[2:]) < window_size:
        raise ValueError(f"images must be at least {window_size}x{window_size} for SSIM")
    # Half precision loses too much in the variance terms (differences of squares).
    dtype = pred.dtype if pred.dtype in (torch.float32, torch.float64) else torch.float32
    x = pred.to(dtype)
    y = target.to(dtype)
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, dtype, x.device)
    kernel_h = window.view(1, 1, 1, -1).expand(channels, 1, 1, window_size)
    kernel_v = window.view(1, 1, -1, 1).expand(channels, 1, window_size, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(z, kernel_h, groups=channels)
        return F.conv2d(z, kernel_v, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(2).mean(2).mean(1)


# --------------------------------------------------------------------------------------------
# FID


@dataclass
class FIDResult:
    """Outcome of :func:`fid`: the value when it could be computed, otherwise why not."""

    value: float | None
    available: bool
    reason: str


_FID_WEIGHTS_GLOB = "pt_inception-2015-12-05-*.pth"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``. The trace of the matrix
    square root is taken as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix ``s1^(1/2) sigma2 s1^(1/2)`` (same spectrum as ``sigma1 sigma2``); working with
    symmetric eigendecompositions avoids the complex round-off a general ``sqrtm`` produces for
    near-singular covariances.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("mean vectors and covariance matrices must have matching shapes")
    if sigma1.shape != (mu1.size, mu1.size):
        raise ValueError("covariance must be a d x d matrix for a d-dimensional mean")

    def sym_sqrt(matrix: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
        return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T

    root1 = sym_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff) + float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt
    # Round-off can push a zero distance slightly negative.
    return max(value, 0.0)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets ``(N, D)`` (e.g. Inception pool3 activations)."""
    stats = []
    for features in (features1, features2):
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError("need an (N, D) feature array with N >= 2")
        stats.append((features.mean(axis=0), np.cov(features, rowvar=False)))
    return frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])


def _find_inception_weights(inception_weights: str | None) -> tuple[str | None, str]:
    """Path of the FID Inception weights, or None and the reason it was not found."""
    if inception_weights is not None:
        if os.path.isfile(inception_weights):
            return inception_weights, ""
        return None, f"Inception weights file {inception_weights!r} does not exist"
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    found = sorted(glob.glob(os.path.join(checkpoints, _FID_WEIGHTS_GLOB)))
    if found:
        return found[0], ""
    return None, (
        f"Inception weights ({_FID_WEIGHTS_GLOB}) not found in {checkpoints}; "
        "offline, not downloading (pass inception_weights=<path>)"
    )


@torch.no_grad()
def _inception_features(model: torch.nn.Module, images: torch.Tensor, batch: int) -> np.ndarray:
    chunks = []
    for start in range(0, images.shape[0], batch):
        output = model(images[start : start + batch].float())[0]
        chunks.append(output.flatten(1).cpu().double().numpy())
    return np.concatenate(chunks, axis=0)


def fid(
    pred_images: torch.Tensor,
    real_images: torch.Tensor,
    inception_weights: str | None = None,
    batch_size: int = 50,
) -> FIDResult:
    """FID between completed and real images (NCHW, RGB, [0, 1]) with pytorch-fid's Inception.

    Only runs when ``pytorch-fid`` is importable and its weights file is either given by path or
    already in the torch hub cache (``torch.hub.get_dir()/checkpoints``); it never downloads.
    Otherwise returns ``available=False`` with the reason. Needs at least 2 images per set
    (meaningful values need thousands).
    """
    for name, images in (("pred_images", pred_images), ("real_images", real_images)):
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 2:
            raise ValueError(f"{name} must be (N>=2, 3, H, W), got {tuple(images.shape)}")
    try:
        # Lazy: pytorch-fid pulls in torchvision, an optional dependency.
        from pytorch_fid import inception as fid_inception
    except Exception as error:  # a broken torchvision raises non-ImportErrors
        return FIDResult(None, False, f"pytorch-fid not installed (pip install dfnet[fid]): {error}")
    path, reason = _find_inception_weights(inception_weights)
    if path is None:
        return FIDResult(None, False, reason)
    if not hasattr(fid_inception, "load_state_dict_from_url"):
        return FIDResult(None, False, "unsupported pytorch-fid version (no weight loader hook)")

    # pytorch-fid fetches its weights by URL; route that one call to the local file so nothing is
    # ever downloaded, whatever the file is called or wherever it lives.
    def load_local(*_args: object, **_kwargs: object) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    original = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = load_local
    try:
        block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
        model = fid_inception.InceptionV3([block], use_fid_inception=True)
    except Exception as error:  # report instead of failing an evaluation
        return FIDResult(None, False, f"could not build the FID Inception network: {error}")
    finally:
        fid_inception.load_state_dict_from_url = original
    model = model.to(pred_images.device).eval()
    features_pred = _inception_features(model, pred_images, batch_size)
    features_real = _inception_features(model, real_images.to(pred_images.device), batch_size)
    value = fid_from_features(features_pred, features_real)
    if not math.isfinite(value):
        return FIDResult(None, False, "FID is not finite (degenerate features)")
    return FIDResult(value, True, f"pytorch-fid Inception weights: {path}")
