"""Inside DFNet's fusion blocks: the alpha composition map α_k and the raw completion C_k.

Block k (0 = finest) blends its raw completion with the scaled input: Î_k = α_k ⊙ C_k +
(1 − α_k) ⊙ I_k. `capture_fusion` records α_k and C_k with forward hooks held only for the
explained pass, so the model's code and its (possibly compiled) inference path stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from dfnet.model import FusionBlock

Captured = tuple[torch.Tensor, torch.Tensor]  # (α_k, C_k) of one pass
#: Names of the pictures `pictures` makes, in the order they are written and returned.
PICTURES: tuple[str, ...] = ("alpha", "alpha_rgb", "raw")


@dataclass
class FusionMaps:
    """One fusion block's maps over a whole photo (H×W, the photo's own size).

    Where the network ran, the maps are the block's, upsampled by pixel repetition; elsewhere
    α is 0 and C the input.
    """

    level: int
    alpha: np.ndarray  # H×W×A uint8, round(255 α); A = the model's alpha_channels (1 or 3)
    raw: np.ndarray  # H×W×3 uint8, C_k

    @property
    def scale(self) -> float:
        """The block's resolution relative to the network input."""
        return 1.0 / 2**self.level


def fusion_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's fusion blocks, finest first (module registration order)."""
    return [module for module in model.modules() if isinstance(module, FusionBlock)]


def check_levels(model: nn.Module, levels: Sequence[int]) -> tuple[int, ...]:
    """`levels` sorted and deduplicated; ValueError for one the model does not have."""
    count = len(fusion_blocks(model))
    for level in levels:
        if not 0 <= int(level) < count:
            raise ValueError(f"fusion level {level} does not exist: this model has {count} (0 = finest … {count - 1})")
    return tuple(sorted({int(level) for level in levels}))


@contextmanager
def capture_fusion(model: nn.Module, levels: Sequence[int]) -> Iterator[dict[int, list[Captured]]]:
    """Within the block, every forward pass of the fusion blocks at `levels` appends
    (α_k, C_k) (N×A×h×w and N×3×h×w float32) to the yielded dict's list for k. The hooks are
    removed on exit."""
    blocks = fusion_blocks(model)
    captured: dict[int, list[Captured]] = {level: [] for level in levels}

    def hook_for(level: int):
        def hook(_module: nn.Module, _args: object, output: tuple[torch.Tensor, ...]) -> None:
            _result, alpha, raw = output
            captured[level].append((alpha.detach().float(), raw.detach().float()))

        return hook

    handles = [blocks[level].register_forward_hook(hook_for(level)) for level in levels]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def alpha_heatmap(alpha: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 RGB: the mean of α over its channels, colour-mapped (inferno: black = 0,
    the input kept; yellow-white = 1, the raw completion taken)."""
    mean = alpha.mean(axis=2) if alpha.ndim == 3 else alpha
    grey = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def alpha_rgb(alpha: np.ndarray) -> np.ndarray:
    """H×W×3 uint8: α per colour channel as that channel (grey when the model has one α)."""
    return np.repeat(alpha, 3, axis=2) if alpha.shape[2] == 1 else alpha


def pictures(maps: FusionMaps) -> dict[str, np.ndarray]:
    """The pictures of one block, named as `PICTURES`: the α heat map (channel mean), α per
    channel as RGB, and the raw completion C."""
    return {"alpha": alpha_heatmap(maps.alpha), "alpha_rgb": alpha_rgb(maps.alpha), "raw": maps.raw}
