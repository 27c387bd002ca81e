"""One loader for every place a DFNet can come from: a model directory (local or
``s3://bucket/prefix``), an official ``.pth`` release checkpoint (converted on load), or
``pretrained`` (the model shipped with the package).

Registered MLflow models (``models:/...``) are resolved to a local directory by
``tracking.registry`` first, so this package imports no MLflow.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs
import torch

from dfnet.model import CONFIG_NAME, PRESETS, WEIGHTS_NAME, DFNet
from dfnet.official import import_official_checkpoint
from dfnet.pretrained import resolve_model_dir
from dfnet.storage import filesystem_for

__all__ = ["load_model", "preset_name"]


def _download_s3(uri: str, dest: Path) -> Path:
    """Copy a model directory (or one .pth file) from S3 into `dest`; returns the local path."""
    fs, key = filesystem_for(uri)
    if key.endswith(".pth"):
        files = {key: dest / PurePosixPath(key).name}
    else:
        files = {f"{key}/{name}": dest / name for name in (CONFIG_NAME, WEIGHTS_NAME)}
    for remote, local in files.items():
        if fs.get_file_info(remote).type != pafs.FileType.File:
            raise FileNotFoundError(f"s3://{remote} not found: not a DFNet model directory or .pth")
        pafs.copy_files(remote, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest / PurePosixPath(key).name if key.endswith(".pth") else dest


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[DFNet, str]:
    """The model at `source` on `device`, and the kind of source it was: "directory", "s3" or
    "official-checkpoint" (a .pth read with ``weights_only=True`` and converted)."""
    with tempfile.TemporaryDirectory(prefix="dfnet-model-") as tmp:
        if str(source).startswith("s3://"):
            location, kind = _download_s3(str(source), Path(tmp)), "s3"
        else:
            location, kind = resolve_model_dir(Path(source).expanduser()), "directory"
            if not location.exists():
                raise FileNotFoundError(f"model source {str(source)!r} does not exist")
        if location.suffix == ".pth":
            converted = Path(tmp) / "converted"
            import_official_checkpoint(location, converted)
            location, kind = converted, "official-checkpoint"
        return DFNet.from_pretrained(location, map_location=device), kind


def preset_name(model: DFNet) -> str:
    """The preset the architecture is, e.g. "small" or "small + ns pre-fill"; else "custom"."""
    plain = dataclasses.replace(model.config, prefill="none")
    for name, config in PRESETS.items():
        if config == plain:
            return name if model.config.prefill == "none" else f"{name} + {model.config.prefill} pre-fill"
    return "custom"
