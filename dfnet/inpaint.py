"""Inpainting photos of any size with a trained DFNet.

`Inpainter` cuts a photo into *windows* (the whole image, or crops around each hole), scales
down those larger than the work size, pads them by reflection to the network's size multiple,
batches windows of equal shape and pastes only the hole pixels back, so every other pixel comes
back bit-exact. Masks are "hole-white" (white = fill, most tools) or "known-white" (the release).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dfnet.explain import FusionMaps, capture_fusion, check_levels
from dfnet.masks import DEFAULT_MASK_CONVENTION, mask_from_image
from dfnet.model import DFNet

Strategy = Literal["auto", "pad", "resize", "crops"]
STRATEGIES: tuple[str, ...] = ("auto", "pad", "resize", "crops")
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Longest window side run at full resolution by default.
DEFAULT_WORK_SIZE = 1024


@dataclass(frozen=True)
class Window:
    """A region of the image run through the network: rows y0:y1, columns x0:x1."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def overlaps(self, other: Window) -> bool:
        return self.y0 < other.y1 and other.y0 < self.y1 and self.x0 < other.x1 and other.x0 < self.x1

    def union(self, other: Window) -> Window:
        return Window(min(self.y0, other.y0), min(self.x0, other.x0), max(self.y1, other.y1), max(self.x1, other.x1))


def hole_windows(hole: np.ndarray, context: float = 0.5, min_margin: int = 32) -> list[Window]:
    """Windows around the holes: each hole's bounding box grown by `context` × its size on every
    side (at least `min_margin` px) for surrounding texture, overlapping windows merged."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(hole.astype(np.uint8), connectivity=8)
    height, width = hole.shape
    windows: list[Window] = []
    for x, y, w, h, _area in stats[1:count]:
        margin = max(min_margin, int(context * max(w, h)))
        windows.append(
            Window(max(0, y - margin), max(0, x - margin), min(height, y + h + margin), min(width, x + w + margin))
        )
    merged = True
    while merged:  # merge until no two windows overlap; a pixel is then filled by one window only
        merged = False
        for i in range(len(windows)):
            for j in range(i + 1, len(windows)):
                if windows[i].overlaps(windows[j]):
                    windows[i] = windows[i].union(windows.pop(j))
                    merged = True
                    break
            if merged:
                break
    return windows


def _to_uint8(x: torch.Tensor, quantization: str) -> np.ndarray:
    """N3HW float in [0, 1] → NHW3 uint8. "floor" reproduces the release's `x.mul(255).byte()`."""
    scaled = x.clamp(0, 1).mul(255)
    scaled = scaled.floor() if quantization == "floor" else scaled.round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Inpainter:
    """Fills holes in 8-bit RGB, RGBA and L photos of any size with a DFNet.

    work_size: longest window side at network resolution; larger windows are scaled down, which
    costs detail inside the hole only. It follows the photo, not the training crop: a fully
    convolutional network fills holes at the photo's own resolution.
    """

    def __init__(
        self,
        model: DFNet,
        device: str | torch.device = "cpu",
        *,
        work_size: int | None = None,
        max_batch: int = 8,
        quantization: Literal["round", "floor"] | None = None,
        runner: Runner | None = None,
    ):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        provenance = getattr(model, "provenance", {}) or {}
        self.multiple = model.config.size_multiple
        self.work_size = work_size or DEFAULT_WORK_SIZE
        self.max_batch = max_batch
        self.quantization = quantization or provenance.get("output_quantization", "round")
        self.runner: Runner = runner or model.complete

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", **kwargs) -> Inpainter:
        return cls(DFNet.from_pretrained(directory, map_location=device), device, **kwargs)

    # ------------------------------------------------------------------ public API
    def inpaint(
        self,
        image: Image.Image | np.ndarray,
        mask: Image.Image | np.ndarray,
        *,
        mask_convention: str = DEFAULT_MASK_CONVENTION,
        strategy: Strategy = "auto",
    ) -> Image.Image:
        """Complete one image; returns an image of the input's size and mode."""
        return self.inpaint_batch([image], [mask], mask_convention=mask_convention, strategy=strategy)[0]

    def inpaint_batch(
        self,
        images: Sequence[Image.Image | np.ndarray],
        masks: Sequence[Image.Image | np.ndarray],
        *,
        mask_convention: str = DEFAULT_MASK_CONVENTION,
        strategy: Strategy = "auto",
    ) -> list[Image.Image]:
        """Complete many images; windows of equal network shape share forward passes."""
        return self._complete(images, masks, mask_convention, strategy, ())[0]

    def explain_batch(
        self,
        images: Sequence[Image.Image | np.ndarray],
        masks: Sequence[Image.Image | np.ndarray],
        *,
        levels: Sequence[int] = (0,),
        mask_convention: str = DEFAULT_MASK_CONVENTION,
        strategy: Strategy = "auto",
    ) -> list[tuple[Image.Image, list[FusionMaps]]]:
        """`inpaint_batch`, plus the α and C maps of the fusion blocks at `levels` (0 = finest)
        over each photo. The maps come from one more pass of the plain model, hooked for that
        pass only, so the images are exactly `inpaint_batch`'s."""

        levels = check_levels(self.model, levels)
        if not levels:
            raise ValueError("explain needs at least one fusion level")
        results, maps = self._complete(images, masks, mask_convention, strategy, levels)
        return list(zip(results, maps, strict=True))

    def _complete(
        self,
        images: Sequence[Image.Image | np.ndarray],
        masks: Sequence[Image.Image | np.ndarray],
        mask_convention: str,
        strategy: Strategy,
        levels: tuple[int, ...],
    ) -> tuple[list[Image.Image], list[list[FusionMaps]]]:
        if len(images) != len(masks):
            raise ValueError(f"got {len(images)} images but {len(masks)} masks")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        originals = [_as_array(img) for img in images]
        rgbs = [_rgb(a) for a in originals]
        holes = []
        for rgb, m in zip(rgbs, masks):
            known = mask_from_image(_as_array(m), mask_convention)
            if known.shape != rgb.shape[:2]:
                raise ValueError(f"mask size {known.shape[::-1]} differs from image size {rgb.shape[1::-1]} (W×H)")
            holes.append(known == 0)
        filled = [rgb.copy() for rgb in rgbs]
        alpha_channels = self.model.config.alpha_channels
        maps = [
            [FusionMaps(k, np.zeros((*rgb.shape[:2], alpha_channels), np.uint8), rgb.copy()) for k in levels]
            for rgb in rgbs
        ]

        # Plan: (image index, window, network input size) for every window, grouped by size.
        groups: dict[tuple[int, int], list[tuple[int, Window, float]]] = {}
        for index, hole in enumerate(holes):
            if not hole.any():
                continue
            for window, scale in self._plan(hole, strategy):
                size = (self._round_up(window.height * scale), self._round_up(window.width * scale))
                groups.setdefault(size, []).append((index, window, scale))

        for size, jobs in groups.items():
            for start in range(0, len(jobs), self.max_batch):
                chunk = jobs[start : start + self.max_batch]
                batch = [self._network_input(rgbs[i], holes[i], w, s, size) for i, w, s in chunk]
                image_t = torch.stack([b[0] for b in batch]).to(self.device)
                known_t = torch.stack([b[1] for b in batch]).to(self.device)
                with torch.inference_mode():
                    completed = self.runner(image_t, known_t).float()
                for (i, w, s), out in zip(chunk, completed):
                    self._paste(filled[i], holes[i], w, s, out)
                if levels:
                    self._paste_maps(image_t, known_t, size, chunk, [maps[i] for i, _, _ in chunk], levels)

        results = [_restore_mode(orig, rgb_filled, hole) for orig, rgb_filled, hole in zip(originals, filled, holes)]
        return results, maps

    def _paste_maps(
        self,
        image_t: torch.Tensor,
        known_t: torch.Tensor,
        size: tuple[int, int],
        chunk: list[tuple[int, Window, float]],
        targets: list[list[FusionMaps]],
        levels: tuple[int, ...],
    ) -> None:
        """One pass of the plain model over a batch, hooked; its maps pasted over the windows."""
        with torch.inference_mode(), capture_fusion(self.model, levels) as captured:
            self.model(image_t, known_t)
        for k, level in enumerate(levels):
            ((alpha, raw),) = captured[level]  # one call per block and pass
            alpha = F.interpolate(alpha, size=size, mode="nearest")  # the block's pixels, repeated
            raw = F.interpolate(raw, size=size, mode="nearest")
            for j, ((_, window, scale), image_maps) in enumerate(zip(chunk, targets, strict=True)):
                maps = image_maps[k]
                region = (slice(window.y0, window.y1), slice(window.x0, window.x1))
                maps.alpha[region] = self._window_pixels(alpha[j], window, scale, "round")
                maps.raw[region] = self._window_pixels(raw[j], window, scale, self.quantization)

    # ------------------------------------------------------------------ internals
    def _round_up(self, length: float) -> int:
        return max(self.multiple, math.ceil(round(length, 6) / self.multiple) * self.multiple)

    def _plan(self, hole: np.ndarray, strategy: Strategy) -> list[tuple[Window, float]]:
        """The windows to run and the scale (≤ 1) each is run at."""
        height, width = hole.shape
        if strategy == "auto":
            # Small photos: the whole image gives the most context. Large photos (a 4000×3000
            # shot with a small scratch): only the neighbourhood of each hole is worth computing.
            strategy = "pad" if max(height, width) <= 2 * self.work_size else "crops"
        if strategy == "pad":
            return [(Window(0, 0, height, width), 1.0)]
        windows = hole_windows(hole) if strategy == "crops" else [Window(0, 0, height, width)]
        return [(w, min(1.0, self.work_size / max(w.height, w.width))) for w in windows]

    def _network_input(
        self, rgb: np.ndarray, hole: np.ndarray, window: Window, scale: float, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        crop = rgb[window.y0 : window.y1, window.x0 : window.x1]
        known = (~hole[window.y0 : window.y1, window.x0 : window.x1]).astype(np.float32)
        image = torch.from_numpy(crop.copy()).permute(2, 0, 1).float().div(255)
        known_t = torch.from_numpy(known)[None]
        if scale < 1.0:
            target = (round(window.height * scale), round(window.width * scale))
            image = F.interpolate(image[None], size=target, mode="bilinear", antialias=True, align_corners=False)[0]
            # A pixel is known at the low resolution only if all of its source pixels were.
            known_t = (F.interpolate(known_t[None], size=target, mode="area")[0] > 0.999).float()
        pad_h, pad_w = size[0] - image.shape[1], size[1] - image.shape[2]
        # Reflection gives the network plausible context in the padding; padding counts as known.
        image = torch.from_numpy(np.pad(image.numpy(), ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect"))
        known_t = F.pad(known_t, (0, pad_w, 0, pad_h), value=1.0)
        return image, known_t

    def _window_pixels(self, out: torch.Tensor, window: Window, scale: float, quantization: str) -> np.ndarray:
        """A network output (C×H×W, [0, 1], at the padded network size) back to the window's
        own size: the padding cropped off, the scale undone. H×W×C uint8."""
        height, width = window.height, window.width
        if scale >= 1.0:
            out = out[:, :height, :width]
        else:
            small = (round(height * scale), round(width * scale))
            out = F.interpolate(out[None, :, : small[0], : small[1]], size=(height, width), mode="bilinear")[0]
        return _to_uint8(out[None], quantization)[0]

    def _paste(self, target: np.ndarray, hole: np.ndarray, window: Window, scale: float, out: torch.Tensor) -> None:
        pixels = self._window_pixels(out, window, scale, self.quantization)
        region = target[window.y0 : window.y1, window.x0 : window.x1]
        region_hole = hole[window.y0 : window.y1, window.x0 : window.x1]
        region[region_hole] = pixels[region_hole]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
        return np.asarray(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got dtype {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected an H×W, H×W×3 or H×W×4 image, got shape {array.shape}")
    return array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def _restore_mode(original: np.ndarray, filled_rgb: np.ndarray, hole: np.ndarray) -> Image.Image:
    """Back to the input's mode; outside the hole every value is the input's own."""
    result = original.copy()
    if original.ndim == 2:
        grey = np.asarray(Image.fromarray(filled_rgb).convert("L"))
        result[hole] = grey[hole]
    else:
        result[..., :3][hole] = filled_rgb[hole]
    return Image.fromarray(result)
