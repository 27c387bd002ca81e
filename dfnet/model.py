"""DFNet: Deep Fusion Network for Image Completion (Hong et al., ACM MM 2019).

A U-Net whose six finest decoder outputs each feed a *fusion block*. For decoder feature map
F_k (k = 1 is the finest scale in the paper; index 0 in the lists this module returns):

    I_k  = (image * mask) resized to F_k's size               the known pixels at that scale
    C_k  = sigmoid(conv1x1(F_k))                             the raw completion ("raw")
    α_k  = BlendBlock(cat[I_k, C_k])                         a per-pixel, per-channel alpha
    Î_k  = α_k ⊙ C_k + (1 − α_k) ⊙ I_k                       the fused result

With `prefill` set (a departure from the paper, off in both presets) the holes are first filled
(`pyramid_prefill`, or OpenCV's Navier–Stokes or Telea), the network and every I_k see that
pre-filled image P instead of the zero-filled one, and the raw completion is a correction of it:

    C_k  = sigmoid(logit(P_k) + conv1x1(F_k))                the correction conv starts at zero

so an untrained network returns exactly the pre-fill (Î_k = α_k P_k + (1 − α_k) P_k) and training
only has to learn where and how to improve on it.

Conventions: images are float NCHW in [0, 1] (no mean/std normalisation), masks are N1HW with
1 = known pixel and 0 = hole. Height and width must be multiples of `config.size_multiple`
(2 ** levels); `dfnet.inpaint.Inpainter` pads or crops arbitrary photos to that.

Model directories follow the `save_pretrained` / `from_pretrained` habit: `config.json`
(architecture + provenance) beside `model.safetensors`. The authors' released checkpoints are
imported by `dfnet.official`; faster forms of the same network for inference are built by
`dfnet.accelerate`.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfnet.params import FusionMode, ModelParams, Prefill
from dfnet.pretrained import resolve_model_dir

_PREFILL_FLAGS = {"ns": cv2.INPAINT_NS, "telea": cv2.INPAINT_TELEA}


@dataclass(frozen=True)
class DFNetConfig:
    """Architecture of a DFNet. The defaults are the paper's network (the `official` preset)."""

    levels: int = 8  # encoder/decoder stages, each halving/doubling the resolution
    base_channels: int = 64  # width of the first encoder block; doubles per level ...
    max_channels: int = 512  # ... capped here
    kernel_sizes: tuple[int, ...] = (7, 5, 5, 3, 3, 3, 3, 3)  # encoder kernels, fine to coarse
    fusion_levels: int = 6  # fusion blocks on this many of the finest decoder outputs
    alpha_channels: int = 3  # 3 = per-channel alpha (the paper), 1 = one alpha per pixel
    blend_channels: int = 32  # hidden width of the BlendBlock
    # Ablations of the paper's Figure 5: "blend" is DFNet; "hard" pastes known pixels with the
    # binary mask instead of a learned alpha; "none" outputs the raw completion (plain U-Net).
    fusion: FusionMode = "blend"
    # Holes pre-filled before the network sees them, and C_k a learned correction of that fill:
    # "pyramid" (`pyramid_prefill`, part of the network's graph) or OpenCV's "ns" / "telea" (run
    # on the CPU before it). "none" = the paper: zero-filled holes, C_k from scratch.
    prefill: Prefill = "none"
    # OpenCV's inpaint radius (ns / telea only). The fill's time grows with it.
    prefill_radius: int = 2

    def __post_init__(self) -> None:
        if len(self.kernel_sizes) != self.levels:
            raise ValueError(f"kernel_sizes has {len(self.kernel_sizes)} entries, levels={self.levels}")
        if not 1 <= self.fusion_levels <= self.levels:
            raise ValueError(f"fusion_levels must be in [1, {self.levels}], got {self.fusion_levels}")
        if self.alpha_channels not in (1, 3):
            raise ValueError(f"alpha_channels must be 1 or 3, got {self.alpha_channels}")
        if self.fusion not in ("blend", "hard", "none"):
            raise ValueError(f"fusion must be 'blend', 'hard' or 'none', got {self.fusion!r}")
        if self.prefill not in ("none", "pyramid", *_PREFILL_FLAGS):
            raise ValueError(f"prefill must be 'none', 'pyramid', 'ns' or 'telea', got {self.prefill!r}")

    @property
    def opencv_prefill(self) -> bool:
        """Whether the holes are pre-filled by OpenCV, outside the network's graph."""
        return self.prefill in _PREFILL_FLAGS

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (one factor 2 per encoder stage)."""
        return 2**self.levels

    @property
    def channels(self) -> list[int]:
        """Feature widths c_0..c_L: c_0 = 4 (RGB + mask), then base · 2^i capped at max."""
        return [4] + [min(self.base_channels * 2**i, self.max_channels) for i in range(self.levels)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DFNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DFNetConfig fields: {sorted(unknown)}")
        values = dict(data)
        if "kernel_sizes" in values:
            values["kernel_sizes"] = tuple(values["kernel_sizes"])
        return cls(**values)


PRESETS: dict[str, DFNetConfig] = {
    # The paper's network: 32,880,504 parameters, inputs in multiples of 256.
    "official": DFNetConfig(),
    # Trains usefully on a 2-core CPU in minutes: 1,176,792 parameters, inputs in multiples of 64
    # (64², 128², ...), fusion on the 4 finest scales.
    "small": DFNetConfig(
        levels=6,
        base_channels=16,
        max_channels=128,
        kernel_sizes=(7, 5, 5, 3, 3, 3),
        fusion_levels=4,
        blend_channels=16,
    ),
}


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow-style "same" zero padding.

    Total padding is k − s; when it is odd the extra pixel goes on the right/bottom, which is what
    the released weights were trained with (a symmetric pad would shift every feature map). Only
    that asymmetric case (DFNet's stride-2 encoder convs) pads explicitly; an even total (the
    stride-1 convs) is symmetric, and nn.Conv2d pads it itself without copying the input.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        total = max(kernel_size - stride, 0)
        before = total // 2
        symmetric = total % 2 == 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=before if symmetric else 0)
        # left, right, top, bottom; None when nn.Conv2d's own padding does it
        self.same_pad: tuple[int, int, int, int] | None = (
            None if symmetric else (before, total - before, before, total - before)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad is not None:
            x = F.pad(x, self.same_pad)
        return super().forward(x)


class EncoderBlock(nn.Module):
    """Stride-2 conv → BatchNorm → ReLU (the first block is a bare conv)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, first: bool):
        super().__init__()
        self.conv = Conv2dSame(in_channels, out_channels, kernel_size, stride=2)
        self.norm = nn.Identity() if first else nn.BatchNorm2d(out_channels)
        self.act = nn.Identity() if first else nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class DecoderBlock(nn.Module):
    """Nearest ×2 upsample, concat the same-resolution skip, 3×3 conv → BatchNorm → LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv = Conv2dSame(in_channels + skip_channels, out_channels, 3, stride=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        upsampled = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.act(self.norm(self.conv(torch.cat([upsampled, skip], dim=1))))


class BlendBlock(nn.Module):
    """α_k = BlendBlock(cat[I_k, C_k]): 1×1 → BN → LReLU → 3×3 → BN → LReLU → 1×1 → sigmoid."""

    def __init__(self, hidden: int, alpha_channels: int):
        super().__init__()
        # One Sequential so the layer indices line up with the released checkpoints (0, 1, 3, 4, 6).
        self.layers = nn.Sequential(
            Conv2dSame(6, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.2, inplace=True),
            Conv2dSame(hidden, 3, 3),
            nn.BatchNorm2d(3),
            nn.LeakyReLU(0.2, inplace=True),
            Conv2dSame(3, alpha_channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, known: Tensor, raw: Tensor) -> Tensor:
        return self.layers(torch.cat([known, raw], dim=1))

    @torch.no_grad()
    def start_alpha_at(self, alpha: float) -> None:
        """Initialise the last layer so α starts near `alpha` everywhere (a training choice, not
        the paper's: with zero-filled holes an α below 1 darkens the fill, and a network that
        starts there learns an over-bright C_k against a per-channel α instead of the colour)."""
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        last = self.layers[6]
        last.weight.mul_(0.1)
        last.bias.fill_(float(torch.logit(torch.tensor(alpha))))


def pyramid_prefill(image: Tensor, mask: Tensor, smoothing_steps: int = 4) -> Tensor:
    """`image` with its holes filled from a pyramid of its known pixels ("pull-push").

    Pull: halve the image down to one pixel, each cell holding the mean colour of its known
    pixels and a confidence w = min(1, known pixels / a quarter of the cell). Push: from the
    coarsest level down, the holes take the bilinearly upsampled coarser fill, then a few 3×3
    averaging steps inside the holes smooth it (a harmonic fill's start). Known pixels stay exact.
    Plain tensor ops, so unlike OpenCV's fills it compiles and exports with the network.
    """
    # Premultiplied: colour = w · mean colour, so a level's fill is colour + (1 − w) · elsewhere.
    colours, weights = [image * mask], [mask]
    while min(colours[-1].shape[-2:]) > 1:
        colour, weight = F.avg_pool2d(colours[-1], 2), F.avg_pool2d(weights[-1], 2)
        # A cell is as sure of its colour as its surest quarter could make it.
        gain = (4.0 * weight).clamp(max=1.0) / weight.clamp_min(1e-8)
        colours.append(colour * gain)
        weights.append(weight * gain)
    # Cells of the coarsest level that saw no known pixel take the image's mean known colour.
    mean = colours[0].sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1.0)
    fill = colours[-1] + (1.0 - weights[-1]) * mean
    for colour, weight in zip(reversed(colours[:-1]), reversed(weights[:-1])):
        fill = colour + (1.0 - weight) * F.interpolate(fill, size=colour.shape[-2:], mode="bilinear")
        for _ in range(smoothing_steps):
            neighbours = F.avg_pool2d(F.pad(fill, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            fill = colour + (1.0 - weight) * neighbours
    return fill


@torch.no_grad()
def classical_prefill(image: Tensor, mask: Tensor, method: Prefill, radius: int) -> Tensor:
    """`image` with its holes filled by OpenCV's inpainting (`method` "ns" or "telea", at
    `radius`), per image.

    OpenCV works on 8-bit pixels on the CPU, so the fill is quantised like a photo and computed
    there whatever the model's device; known pixels are returned unchanged (not quantised). One
    image's fill runs on one core, so a batch is spread over torch's CPU threads (OpenCV releases
    the GIL).
    """
    pixels = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    holes = (mask.detach()[:, 0] < 0.5).to(torch.uint8).cpu().numpy()

    def fill_one(index: int) -> np.ndarray:
        return cv2.inpaint(np.ascontiguousarray(pixels[index]), holes[index], radius, _PREFILL_FLAGS[method])

    workers = min(len(pixels), torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            filled = np.stack(list(pool.map(fill_one, range(len(pixels)))))
    else:
        filled = np.stack([fill_one(i) for i in range(len(pixels))])
    # NHWC uint8 → NCHW before converting: arithmetic between tensors of different memory
    # layouts runs a slow strided loop. The hole is what OpenCV was given (mask < 0.5); everything
    # else keeps the input's exact values.
    fill = torch.from_numpy(filled).permute(0, 3, 1, 2).contiguous().to(image.device, image.dtype).div_(255)
    return torch.where(mask < 0.5, fill, image)


class FusionBlock(nn.Module):
    """Turns decoder features F_k into an image Î_k = α_k ⊙ C_k + (1 − α_k) ⊙ I_k."""

    def __init__(self, feature_channels: int, config: DFNetConfig):
        super().__init__()
        self.mode = config.fusion
        self.corrects_prefill = config.prefill != "none"
        self.to_image = Conv2dSame(feature_channels, 3, 1)  # C_k before the sigmoid
        if self.corrects_prefill:  # C_k starts as the pre-fill itself: Î_k = P_k whatever α_k is
            nn.init.zeros_(self.to_image.weight)
            nn.init.zeros_(self.to_image.bias)
        self.blend = BlendBlock(config.blend_channels, config.alpha_channels) if self.mode == "blend" else None

    def forward(self, features: Tensor, input_image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`input_image` is what the network was given: image * mask, or the pre-filled image."""
        size = features.shape[-2:]
        known = input_image  # I_k (or P_k); at the finest level the input itself, not an identity resize
        if input_image.shape[-2:] != size:
            known = F.interpolate(input_image, size=size, mode="bilinear", align_corners=False)
        logits = self.to_image(features)
        if self.corrects_prefill:  # black and white stay finite in logit space (±9.2, 0.03 of a grey level)
            logits = logits + torch.logit(known, eps=1e-4)
        raw = torch.sigmoid(logits)  # C_k
        if self.blend is not None:
            alpha = self.blend(known, raw)
        elif self.mode == "hard":
            alpha = 1.0 - F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
        else:
            alpha = torch.ones_like(raw[:, :1])
        result = alpha * raw + (1.0 - alpha) * known
        return result, alpha, raw


class DFNetOutput(NamedTuple):
    """Per-scale tensors, finest first (index 0 = full resolution = the paper's k = 1)."""

    results: list[Tensor]  # Î_k
    alphas: list[Tensor]  # α_k
    raws: list[Tensor]  # C_k


class DFNet(nn.Module):
    """The U-Net of encoder and decoder blocks (skips at every scale) with a fusion block on each
    of the `fusion_levels` finest decoder outputs; see the module docstring."""

    def __init__(self, config: DFNetConfig | None = None):
        super().__init__()
        self.config = config or DFNetConfig()
        c = self.config.channels
        levels = self.config.levels
        self.encoder = nn.ModuleList(
            EncoderBlock(c[i], c[i + 1], self.config.kernel_sizes[i], first=i == 0) for i in range(levels)
        )
        # decoder[i] produces the features at the resolution of encoder input i (i = 0: full
        # resolution), so its skip is the input of encoder block i and its width is c_i.
        self.decoder = nn.ModuleList(DecoderBlock(c[i + 1], c[i], c[i]) for i in range(levels))
        self.fusion = nn.ModuleList(FusionBlock(c[i], self.config) for i in range(self.config.fusion_levels))

    def forward(self, image: Tensor, mask: Tensor) -> DFNetOutput:
        """image: N3HW in [0, 1]; mask: N1HW, 1 = known, 0 = hole."""
        return self.forward_filled(self.fill_holes(image, mask), mask)

    def fill_holes(self, image: Tensor, mask: Tensor) -> Tensor:
        """image ⊙ mask, or OpenCV's pre-fill P (on the CPU: kept out of `forward_filled` so that
        one can be compiled or exported whole)."""
        multiple = self.config.size_multiple
        if image.shape[-1] % multiple or image.shape[-2] % multiple:
            raise ValueError(
                f"input size {tuple(image.shape[-2:])} is not a multiple of {multiple}; "
                "pad or resize first (dfnet.inpaint.Inpainter does this for you)"
            )
        if self.config.opencv_prefill:
            return classical_prefill(image, mask, self.config.prefill, self.config.prefill_radius)
        return image * mask

    def forward_filled(self, input_image: Tensor, mask: Tensor) -> DFNetOutput:
        """The network proper, on the output of `fill_holes` (pyramid pre-fill included)."""
        if self.config.prefill == "pyramid":
            input_image = pyramid_prefill(input_image, mask)
        x = torch.cat([input_image, mask], dim=1)
        skips = [x]
        for block in self.encoder:
            skips.append(block(skips[-1]))
        features = skips.pop()  # the bottleneck is not a skip
        decoded: list[Tensor] = []
        for i in reversed(range(len(self.decoder))):
            features = self.decoder[i](features, skips[i])
            decoded.append(features)
        decoded.reverse()  # finest first
        results, alphas, raws = [], [], []
        for block, feats in zip(self.fusion, decoded):
            result, alpha, raw = block(feats, input_image, mask)
            results.append(result)
            alphas.append(alpha)
            raws.append(raw)
        return DFNetOutput(results, alphas, raws)

    @torch.no_grad()
    def complete(self, image: Tensor, mask: Tensor) -> Tensor:
        """The inference output: known pixels pasted back over the finest result Î_1."""
        return image * mask + self(image, mask).results[0] * (1.0 - mask)

    def num_parameters(self) -> int:
        """Conv weights/biases + BatchNorm affine parameters (what the paper's count covers)."""
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------- model directories
    def save_pretrained(self, directory: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write `config.json` (architecture + provenance) and `model.safetensors`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"model": self.config.to_dict(), "provenance": provenance or {}}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_params(cls, spec: ModelParams) -> DFNet:
        """A freshly initialised DFNet as params.yaml's `model` section describes it."""
        levels = {} if spec.fusion_levels is None else {"fusion_levels": spec.fusion_levels}
        model = build_model(spec.preset, fusion=spec.fusion, prefill=spec.prefill, **levels)
        if spec.alpha_init is not None:
            for block in model.fusion:
                if block.blend is not None:
                    block.blend.start_alpha_at(spec.alpha_init)
        return model

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> DFNet:
        """Load a model directory written by `save_pretrained` (or `dfnet import-official`);
        "pretrained" names the model shipped with the package (`dfnet.pretrained`)."""
        from safetensors.torch import load_file

        directory = resolve_model_dir(directory)
        meta = read_model_config(directory)
        model = cls(DFNetConfig.from_dict(meta["model"]))
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        model.load_state_dict(state, strict=True)
        model.provenance = meta.get("provenance", {})
        return model.eval()


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def read_model_config(directory: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a model directory: {"model": {...}, "provenance": {...}}."""
    path = resolve_model_dir(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a DFNet model directory")
    return json.loads(path.read_text())


def build_model(preset: str = "official", **overrides: Any) -> DFNet:
    """A freshly initialised DFNet from a named preset, with optional field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return DFNet(dataclasses.replace(PRESETS[preset], **overrides))


__all__ = [
    "PRESETS",
    "BlendBlock",
    "Conv2dSame",
    "DFNet",
    "DFNetConfig",
    "DFNetOutput",
    "DecoderBlock",
    "EncoderBlock",
    "FusionBlock",
    "build_model",
    "classical_prefill",
    "pyramid_prefill",
    "read_model_config",
]
