"""DFNet training losses (paper Section 3.3): multi-scale structure + texture loss.

Structure is L1 over the ``p`` finest fused results; texture is perceptual + style + TV over the
``q`` finest, each against the ground truth resized to that scale. Perceptual and style use a
frozen VGG16 on [0, 1] images without ImageNet normalisation, as the release did; its ImageNet
weights are never downloaded here (:func:`load_vgg16_features`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfnet.params import LossParams

__all__ = [
    "VGG16Features",
    "load_vgg16_features",
    "gram_matrix",
    "total_variation",
    "DFNetLoss",
    "VGG16_FILENAME",
    "VGG16_ENV_VAR",
    "MIN_VGG_SIDE",
]

logger = logging.getLogger(__name__)

#: File name of torchvision's ImageNet VGG16 checkpoint (as cached by torch.hub).
VGG16_FILENAME = "vgg16-397923af.pth"
#: Environment variable that may point at the VGG16 weights file.
VGG16_ENV_VAR = "DFNET_VGG16_WEIGHTS"
#: Smallest image side (px) on which the VGG terms are computed: after three poolings a smaller
#: scale leaves pool3 empty or too small for its Gram statistics to mean anything.
MIN_VGG_SIDE = 16
#: Seed of the random-init VGG16 fallback, so runs without real weights are at least repeatable.
RANDOM_VGG_SEED = 0

_FALLBACKS = ("random", "off", "error")

# torchvision's VGG16 `features` layout up to pool3: an int is a 3×3 conv (+ReLU) with that many
# output channels, "M" is a 2×2 max-pool. Indices in the Sequential follow torchvision exactly.
_VGG16_UP_TO_POOL3: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M")
# Slice ends (exclusive) of pool1, pool2, pool3 in `features`: [0:5], [5:10], [10:17].
_POOL_ENDS = (5, 10, 17)


class VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` up to and including pool3, frozen and always in eval mode.

    Parameter names are torchvision's, so the ImageNet checkpoint loads directly once its other
    keys are dropped. Gradients still flow to the *input*, which the texture losses need.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        # fork_rng: the default nn.Conv2d init draws from the global RNG; building the loss must
        # not shift the random stream that seeds model init or data order elsewhere.
        with torch.random.fork_rng(devices=[]):
            for item in _VGG16_UP_TO_POOL3:
                if item == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    out_ch = int(item)
                    layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
                    layers.append(nn.ReLU(inplace=False))
                    in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.reset_parameters(RANDOM_VGG_SEED)
        self.requires_grad_(False)
        self.eval()

    def reset_parameters(self, seed: int = RANDOM_VGG_SEED) -> None:
        """Seeded random init (torchvision's VGG scheme: Kaiming-normal fan-out, zero bias)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.features:
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=gen)
                    nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> VGG16Features:
        """Ignore ``mode``: the loss network is always in eval mode."""
        return super().train(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return (pool1, pool2, pool3) for a N×3×H×W image batch in [0, 1]."""
        outputs: list[Tensor] = []
        start = 0
        for end in _POOL_ENDS:
            for idx in range(start, end):
                x = self.features[idx](x)
            outputs.append(x)
            start = end
        return outputs[0], outputs[1], outputs[2]


def _candidate_paths(weights: str | None) -> tuple[list[Path], list[str]]:
    """Paths to try in order, and a human-readable description of each place looked in."""
    paths: list[Path] = []
    looked: list[str] = []
    if weights:
        paths.append(Path(weights).expanduser())
        looked.append(f"explicit path {weights!r}")
    env = os.environ.get(VGG16_ENV_VAR)
    if env:
        paths.append(Path(env).expanduser())
        looked.append(f"${VGG16_ENV_VAR}={env!r}")
    else:
        looked.append(f"${VGG16_ENV_VAR} (unset)")
    hub = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME
    paths.append(hub)
    looked.append(f"torch hub cache {str(hub)!r}")
    return paths, looked


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a checkpoint without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"VGG16 weights file {str(path)!r} does not hold a state dict")
    return state


def _keep_up_to_pool3(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop every key that is not ``features.<i>.*`` with i < 17 (classifier, deeper convs)."""
    kept: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        is_feature = len(parts) == 3 and parts[0] == "features" and parts[1].isdigit()
        if is_feature and int(parts[1]) < _POOL_ENDS[-1]:
            kept[key] = value
    return kept


def load_vgg16_features(weights: str | None, fallback: str) -> tuple[VGG16Features | None, str]:
    """The frozen VGG16 pool1–pool3 extractor and a provenance string saying where its weights
    came from.

    Looks at ``weights``, ``$DFNET_VGG16_WEIGHTS`` and torchvision's hub cache, never downloads;
    a file without the needed keys raises. When none exists, ``fallback`` decides: ``"random"``
    (seeded random init), ``"off"`` (None: texture terms disabled) or ``"error"``.
    """
    if fallback not in _FALLBACKS:
        raise ValueError(f"texture_fallback must be one of {_FALLBACKS}, got {fallback!r}")
    paths, looked = _candidate_paths(weights)
    for path in paths:
        if path.is_file():
            module = VGG16Features()
            state = _keep_up_to_pool3(_read_state_dict(path))
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"{str(path)!r} is not a torchvision VGG16 state dict (features.0–14): {exc}") from exc
            module.requires_grad_(False)
            return module, f"imagenet:{path}"

    where = "; ".join(looked)
    how = (
        f"pass loss.vgg_weights, set ${VGG16_ENV_VAR}, or put torchvision's {VGG16_FILENAME}"
        " in the torch hub cache's checkpoints/ folder"
    )
    if fallback == "error":
        raise FileNotFoundError(f"ImageNet VGG16 weights not found (looked in: {where}); {how}.")
    if fallback == "off":
        logger.warning(
            "ImageNet VGG16 weights not found (looked in: %s). Perceptual and style loss terms are "
            "DISABLED (texture_fallback='off'); only TV remains of the texture loss. To use them, "
            "%s.",
            where,
            how,
        )
        return None, "off"
    logger.warning(
        "ImageNet VGG16 weights not found (looked in: %s). Using a RANDOMLY INITIALISED frozen "
        "VGG16 (seed %d) for the perceptual and style losses: a weak proxy, not the paper's loss. "
        "To use the real weights, %s.",
        where,
        RANDOM_VGG_SEED,
        how,
    )
    return VGG16Features(), f"random-init (ImageNet VGG16 weights not found: looked in {where})"


def gram_matrix(features: Tensor) -> Tensor:
    """Batched Gram matrix F Fᵀ / (C·H·W) of N×C×H×W features → N×C×C.

    Computed in float32 even under autocast: the sums run over H·W products and overflow or lose
    most of their precision in half precision.
    """
    n, c, h, w = features.shape
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    flat = features.reshape(n, c, h * w)
    with torch.autocast(device_type=features.device.type, enabled=False):
        return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False); a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def total_variation(image: Tensor, mask: Tensor) -> Tensor:
    """Mask-weighted total variation: mean |k ∗ image · mask| with the spec's 3×3 kernel, the
    mask (1 = known) resized to the image, as the spec states literally.

    Replicate padding, because zeros would read the outside as black and charge every image a
    TV cost along its borders; this way a constant image has TV 0.
    """
    channels = image.shape[1]
    kernel = image.new_tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    weight = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    response = F.conv2d(padded, weight, groups=channels)
    weight_map = _resize(mask.to(image.dtype), tuple(image.shape[-2:]))
    return (response * weight_map).abs().mean()


class DFNetLoss(nn.Module):
    """The DFNet loss over the model's multi-scale fused results.

    ``forward`` returns ``total`` and its four weighted terms, detached for logging.
    ``provenance`` and ``texture_enabled`` say which VGG16 the texture terms used, for the run's
    parameters; with both their weights at 0 no VGG is loaded at all.
    """

    def __init__(self, config: LossParams) -> None:
        super().__init__()
        for name in ("p", "q"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"loss.{name} must be an int ≥ 0, got {value!r}")
        if config.p == 0 and config.q == 0:
            raise ValueError("loss.p and loss.q are both 0: the loss would be empty")
        if config.texture_fallback not in _FALLBACKS:
            raise ValueError(f"loss.texture_fallback must be one of {_FALLBACKS}, got {config.texture_fallback!r}")
        self.config = config
        self.vgg: VGG16Features | None
        if config.q > 0 and (config.perceptual != 0 or config.style != 0):
            self.vgg, self.provenance = load_vgg16_features(config.vgg_weights, config.texture_fallback)
        else:
            self.vgg, self.provenance = None, "off (perceptual and style not used)"
        self.texture_enabled = self.vgg is not None

    def _vgg_terms(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(perceptual, style) for one scale, unweighted, each summed over pool1–pool3."""
        assert self.vgg is not None
        pred_feats = self.vgg(pred)
        with torch.no_grad():  # the target is a constant: no graph needed through its VGG pass
            target_feats = self.vgg(target)
        perceptual = pred.new_zeros((), dtype=torch.float32)
        style = pred.new_zeros((), dtype=torch.float32)
        for fp, ft in zip(pred_feats, target_feats, strict=True):
            perceptual = perceptual + F.l1_loss(fp.float(), ft.float())
            style = style + F.l1_loss(gram_matrix(fp), gram_matrix(ft))
        return perceptual, style

    def forward(self, results: list[Tensor], target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Loss of ``results`` (finest first) against ``target`` (N×3×H×W) with ``mask``
        (N×1×H×W, 1 = known)."""
        cfg = self.config
        n_scales = len(results)
        if cfg.p > n_scales or cfg.q > n_scales:
            raise ValueError(
                f"p={cfg.p} and q={cfg.q} must not exceed the number of fused scales the model returns ({n_scales})"
            )
        if target.shape != results[0].shape:
            raise ValueError(f"target shape {tuple(target.shape)} != finest result {tuple(results[0].shape)}")
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"mask must be N×1×H×W matching the target, got {tuple(mask.shape)}")

        zero = results[0].new_zeros((), dtype=torch.float32)
        targets = [_resize(target.to(r.dtype), tuple(r.shape[-2:])) for r in results[: max(cfg.p, cfg.q)]]

        structure = zero
        if cfg.p > 0:
            l1 = sum(F.l1_loss(results[k].float(), targets[k].float()) for k in range(cfg.p))
            structure = cfg.l1 * l1 / cfg.p

        perceptual, style, tv = zero, zero, zero
        if cfg.q > 0:
            tv_sum = zero
            perc_sum, style_sum, vgg_scales = zero, zero, 0
            for k in range(cfg.q):
                tv_sum = tv_sum + total_variation(results[k].float(), mask)
                if self.vgg is not None and min(results[k].shape[-2:]) >= MIN_VGG_SIDE:
                    p_k, s_k = self._vgg_terms(results[k], targets[k])
                    perc_sum, style_sum = perc_sum + p_k, style_sum + s_k
                    vgg_scales += 1
            tv = cfg.tv * tv_sum / cfg.q
            # Average over the scales the VGG could see, so skipping a tiny scale does not
            # silently shrink the term's weight.
            if vgg_scales > 0:
                perceptual = cfg.perceptual * perc_sum / vgg_scales
                style = cfg.style * style_sum / vgg_scales

        total = structure + perceptual + style + tv
        return {
            "total": total,
            "structure": structure.detach(),
            "perceptual": perceptual.detach(),
            "style": style.detach(),
            "tv": tv.detach(),
        }
