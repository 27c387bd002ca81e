"""The decoder block without its upsampled tensor: the same function as `DecoderBlock`, faster.

A 3×3 conv of a nearest ×2 upsample is, at each of the four output phases, a 2×2 conv of the
low-resolution map (`subpixel_kernels`), or all four phases at once a stride-2 transposed conv
with 4×4 kernels (`transposed_kernels`). Either way the upsampled part runs at a quarter of the
pixels and up(x) is never written. `dfnet.accelerate` swaps these blocks in for inference
(`use_fast_decoders`); training keeps the paper's form in `dfnet.model`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfnet.model import DecoderBlock, DFNet

__all__ = ["FastDecoderBlock", "add_phases", "subpixel_kernels", "transposed_kernels", "use_fast_decoders"]


class FastDecoderBlock(nn.Module):
    """A trained `DecoderBlock`'s function (sharing its modules, so its state dict keys too) with
    the upsampled half of the conv run at low resolution: as four sub-pixel phases, or with
    `transposed` as one transposed conv, which inductor fuses better (the phases win eagerly)."""

    def __init__(self, block: DecoderBlock, transposed: bool = False):
        super().__init__()
        self.conv, self.norm, self.act = block.conv, block.norm, block.act
        self.transposed = transposed

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = x.shape[1]
        weight = self.conv.weight
        out = F.conv2d(skip, weight[:, up:], self.conv.bias, padding=1)  # the skip part, full resolution
        pad = 1
        if x.shape[-2:] == (1, 1):
            # A 1×1 map is NCHW and channels_last at once, so inductor and oneDNN disagree on the
            # conv's output layout and a recompiled graph fails its stride checks; 3×3 has one.

            x, pad = F.pad(x, (1, 1, 1, 1)), 0
        elif self.transposed:
            out = out + F.conv_transpose2d(x, transposed_kernels(weight[:, :up]), stride=2, padding=1)
            return self.act(self.norm(out))
        phases = F.conv2d(x, subpixel_kernels(weight[:, :up]), padding=pad)  # (h + 1) × (w + 1)
        return self.act(self.norm(add_phases(out, phases)))


def use_fast_decoders(model: DFNet, transposed: bool) -> None:
    """Replace, in place, each `DecoderBlock` of `model` by a `FastDecoderBlock` of its weights."""
    for index, block in enumerate(model.decoder):
        # Exact type: a subclass brings a forward of its own (bench/inference.py's as-found baseline).
        if type(block) is DecoderBlock:
            model.decoder[index] = FastDecoderBlock(block, transposed)


def subpixel_kernels(weight: Tensor) -> Tensor:
    """The 2×2 kernels that apply 3×3 `weight` (C_out, C, 3, 3) to a nearest ×2 upsample.

    Output row 2i + a of the 3×3 conv (padding 1) reads upsampled rows 2i + a − 1 … 2i + a + 1,
    which are low-resolution rows (i − 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: the kernel
    rows (w0, w1 + w2) over rows (i − 1, i), and (w0 + w1, w2) over (i, i + 1). Columns alike.
    Returns (4 · C_out, C, 2, 2), phase (a, b) = (0, 0), (0, 1), (1, 0), (1, 1) in blocks of C_out.
    """

    def fold(w: Tensor, dim: int, phase: int) -> Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w0, w1 + w2] if phase == 0 else [w0 + w1, w2], dim)

    return torch.cat([fold(fold(weight, 2, a), 3, b) for a in (0, 1) for b in (0, 1)])


def transposed_kernels(weight: Tensor) -> Tensor:
    """The 4×4 kernels of a stride-2 transposed conv (padding 1) that applies 3×3 `weight`
    (C_out, C, 3, 3) to a nearest ×2 upsample; returns (C, C_out, 4, 4), conv_transpose2d's layout.

    A transposed conv adds input row i into output row o through kernel tap o − 2i + 1. The
    sub-pixel rows (see `subpixel_kernels`) put w0 on row i − 1 and w1 + w2 on row i for output
    row 2i, and w0 + w1 on row i, w2 on row i + 1 for output row 2i + 1: taps 3, 1, 2, 0. So the
    taps are (w2, w1 + w2, w0 + w1, w0); columns alike.
    """

    def fold(w: Tensor, dim: int) -> Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    return fold(fold(weight, 2), 3).transpose(0, 1)


def add_phases(out: Tensor, phases: Tensor) -> Tensor:
    """out[:, :, 2i + a, 2j + b] += phases[block (a, b), :, i + a, j + b], in place; returns out.

    `phases` is a 2×2 conv (padding 1) of an h × w map, so it is (h + 1) × (w + 1): phase a = 0
    reads rows (i − 1, i), which is its output row i; phase a = 1 reads rows (i, i + 1), row i + 1.
    Works in out's memory format (NCHW, or channels_last for the fast paths).
    """
    n, c, height, width = out.shape
    h, w = height // 2, width // 2
    if not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last):
        grid = out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, c).permute(0, 5, 1, 2, 3, 4)  # N, C, H, 2, W, 2
    else:
        grid = out.view(n, c, h, 2, w, 2)
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        grid[:, :, :, a, :, b] += phases[:, k * c : (k + 1) * c, a : a + h, b : b + w]
    return out
