"""The DFNet shipped with the package: trained by this project on the offline photo corpus.

Its model card is `dfnet/pretrained/dfnet-small-ns/README.md`; `recipes/pretrained.yaml` is the
recipe that reproduces it. `dfnet inpaint` without `--model`, Serve's `source: auto` (after the
registry's champion and `models/dfnet`) and `train.init_from: pretrained` use it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRETRAINED_NAME", "pretrained_dir", "resolve_model_dir"]

#: The name users may give instead of a path, wherever a model directory is asked for.
PRETRAINED_NAME = "pretrained"


def pretrained_dir() -> Path:
    """The shipped model directory (config.json + model.safetensors + its model card)."""
    return Path(__file__).parent / "dfnet-small-ns"


def resolve_model_dir(source: str | Path) -> Path:
    """A model directory path for `source`: "pretrained" names the shipped model."""
    return pretrained_dir() if str(source) == PRETRAINED_NAME else Path(source)
