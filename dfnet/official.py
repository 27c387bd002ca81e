"""The authors' released checkpoints: map their names onto this project's and load them, checked.

`load_official_state_dict` checks every name and shape and lists what does not match
(`CheckpointMismatchError`); `import_official_checkpoint` is `dfnet import-official`. The
release's layout is in docs/official-checkpoint-keys.tsv.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from dfnet.model import PRESETS, DFNet

__all__ = [
    "CheckpointMismatchError",
    "import_official_checkpoint",
    "load_official_state_dict",
    "official_to_dfnet_key",
]

# The release names modules en_i / de_i / fuse_i (de_0 and fuse_0 are the finest) and wraps
# odd-padded convs in (ConstantPad2d, Conv2d) Sequentials, hence ".conv.1.". This maps each
# release key pattern onto this module's names.
_OFFICIAL_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^en_(\d+)\.encode\.0\.conv\.(?:1\.)?(weight|bias)$"), r"encoder.\1.conv.\2"),
    (re.compile(r"^en_(\d+)\.encode\.1\.(\w+)$"), r"encoder.\1.norm.\2"),
    (re.compile(r"^de_(\d+)\.decode\.0\.conv\.(?:1\.)?(weight|bias)$"), r"decoder.\1.conv.\2"),
    (re.compile(r"^de_(\d+)\.decode\.1\.(\w+)$"), r"decoder.\1.norm.\2"),
    (re.compile(r"^fuse_(\d+)\.map2img\.0\.conv\.(?:1\.)?(weight|bias)$"), r"fusion.\1.to_image.\2"),
    (re.compile(r"^fuse_(\d+)\.blend\.blend\.([036])\.conv\.(?:1\.)?(weight|bias)$"), r"fusion.\1.blend.layers.\2.\3"),
    (re.compile(r"^fuse_(\d+)\.blend\.blend\.([14])\.(\w+)$"), r"fusion.\1.blend.layers.\2.\3"),
]


class CheckpointMismatchError(ValueError):
    """Raised when an external checkpoint does not fit the model; lists every problem."""


def official_to_dfnet_key(key: str) -> str | None:
    """This project's name for a release state-dict key, or None if it is not a known pattern."""
    for pattern, replacement in _OFFICIAL_RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def _flip_rgb_bgr(state: dict[str, Tensor], fusion_levels: int) -> None:
    """Make BGR-trained weights take and give RGB, in place.

    Colour enters the network in three places and leaves it in two: the first encoder conv and
    the finest decoder conv (its skip is the raw input) read [B, G, R, mask]; every BlendBlock
    reads cat[I_k, C_k] (both BGR). Each C_k conv and each alpha conv write BGR. Reversing those
    input/output channels gives bit-for-bit the same arithmetic on RGB tensors.
    """
    rgb = torch.tensor([2, 1, 0])

    def flip_inputs(key: str, start: int) -> None:
        w = state[key].clone()
        w[:, start : start + 3] = state[key][:, start + rgb]
        state[key] = w

    flip_inputs("encoder.0.conv.weight", 0)
    finest_skip_start = state["decoder.0.conv.weight"].shape[1] - 4  # [upsampled, skip(4)]
    flip_inputs("decoder.0.conv.weight", finest_skip_start)
    for k in range(fusion_levels):
        for name in ("weight", "bias"):
            state[f"fusion.{k}.to_image.{name}"] = state[f"fusion.{k}.to_image.{name}"][rgb].clone()
        flip_inputs(f"fusion.{k}.blend.layers.0.weight", 0)
        flip_inputs(f"fusion.{k}.blend.layers.0.weight", 3)
        alpha_w = f"fusion.{k}.blend.layers.6.weight"
        if state[alpha_w].shape[0] == 3:  # per-channel alpha is in BGR order too
            for name in ("weight", "bias"):
                key = f"fusion.{k}.blend.layers.6.{name}"
                state[key] = state[key][rgb].clone()


def load_official_state_dict(
    model: DFNet, official: dict[str, Tensor], channel_order: Literal["bgr", "rgb"] = "bgr"
) -> None:
    """Load the authors' released state dict into `model`, checking every name and shape.

    `channel_order="bgr"` (the release read images with OpenCV) rewires the colour channels so
    this project's RGB API computes what the release computed on the same pixels. Raises
    CheckpointMismatchError listing unknown, missing and wrongly shaped tensors.
    """
    expected = model.state_dict()
    renamed: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, value in official.items():
        ours = official_to_dfnet_key(key)
        if ours is None or ours not in expected:
            problems.append(f"unexpected key {key!r}")
        elif tuple(value.shape) != tuple(expected[ours].shape):
            problems.append(
                f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, model {tuple(expected[ours].shape)}"
            )
        else:
            renamed[ours] = value
    missing = sorted(set(expected) - set(renamed) - {official_to_dfnet_key(k) for k in official})
    problems += [f"missing key {k!r} (no tensor in the checkpoint maps to it)" for k in missing]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not match the {model.config.levels}-level DFNet "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    if channel_order == "bgr":
        _flip_rgb_bgr(renamed, model.config.fusion_levels)
    model.load_state_dict(renamed, strict=True)


def import_official_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> DFNet:
    """`dfnet import-official`: read a released `.pth` safely and write a model directory."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{checkpoint} does not hold a state dict (got {type(state).__name__})")
    state = state.get("state_dict", state)
    model = DFNet(PRESETS["official"])
    load_official_state_dict(model, state, channel_order="bgr")
    model.save_pretrained(
        out_dir,
        provenance={
            "source": "official",
            "checkpoint": Path(checkpoint).name,
            "channel_order": "converted from BGR to RGB at import",
            "output_quantization": "floor",  # the release wrote x.mul(255).byte()
        },
    )
    return model.eval()
