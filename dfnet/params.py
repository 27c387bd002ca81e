"""`params.yaml`, parsed into typed dataclasses — the only place configuration is read.

Every stage, the Tune search and the benchmarks call `load_params()`; nothing else opens the
YAML. params.yaml is the one place a value is written: these dataclasses type and check it and
carry no defaults, so a missing key is an error naming it, and so is an unknown key (a typo fails
loudly instead of being ignored). A recipe (`recipes/*.yaml`) is an overlay: only the keys it
changes, merged over params.yaml by `load_params(recipe=...)`.

This module sits at the bottom: it imports nothing from the library, so a stage that parses
params does not depend on the model or the losses (the model is built by `DFNet.from_params`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

FusionMode = Literal["blend", "hard", "none"]
Prefill = Literal["none", "pyramid", "ns", "telea"]


@dataclass
class CorpusParams:
    """The embedded default's photos: real photographs from Debian packages (no install)."""

    source: str  # debian (the packages of photo-corpus.md) | sample (bundled photos, offline, fast)
    out_dir: str  # photos/ (the prepare stage's folder source), report.json
    manifest: str  # every photo: package, path inside, licence, sha256
    download_dir: str  # downloaded .deb files, kept so a rerun downloads nothing
    max_short_side: int  # photos are stored no larger than this (short side)


@dataclass
class DataParams:
    source: str  # "sample", a local folder (the corpus stage's photos), or s3://bucket/prefix
    image_size: int  # training crop side, drawn fresh every epoch from the stored photos
    store_short_side: int  # photos are stored this large (short side): crops and whole-photo eval
    val_fraction: float
    test_fraction: float
    shard_rows: int  # photos per Parquet shard
    out_dir: str


@dataclass
class MaskParams:
    pool_size: int
    # Pool masks are drawn like whole-photo masks at this short side; a training crop gets the
    # share of one that it shows of its photo, so holes keep their whole-photo scale.
    size: int
    seed: int
    out: str


@dataclass
class ModelParams:
    preset: str
    fusion: FusionMode
    fusion_levels: int | None  # None = the preset's (ablation: 1 = a single fusion block)
    alpha_init: float | None  # None = PyTorch's default init (the paper); e.g. 0.95: α starts near 1
    prefill: Prefill  # pyramid | ns | telea: holes pre-filled, C_k corrects the fill | none: the paper


@dataclass
class LossParams:
    """Weights and scale sets of the DFNet loss (`dfnet.losses.DFNetLoss` checks them).

    ``p`` and ``q`` are the structure and texture losses' scale counts; the paper's ``official``
    preset (six fusion levels) uses its release values p = 6, q = 3 (README, "Scaling up").

    ``texture_fallback`` decides what happens when the ImageNet VGG16 weights cannot be found:
    ``"random"`` uses a seeded, frozen, randomly initialised VGG16 (a weak proxy: the perceptual
    and style terms then do not mean what they mean in the paper), ``"off"`` disables the
    perceptual and style terms (TV is still computed), ``"error"`` raises.
    """

    l1: float
    perceptual: float
    style: float
    tv: float
    p: int
    q: int
    vgg_weights: str | None
    texture_fallback: str


@dataclass
class TrainParams:
    # Start from these weights (a model directory; "pretrained" = the model shipped with the
    # package) instead of a fresh initialisation; None trains from scratch.
    init_from: str | None
    epochs: int
    crops_per_photo: int  # one pass = this many fresh crops of every training photo
    steps_per_epoch: int | None  # None = an epoch is one pass
    shuffle_buffer_mb: float  # crops shuffled across photos, per data stream
    data_inflight_mb: float  # Ray Data's object-store budget for crops in flight
    max_zoom_out: float  # crop windows of image_size × [1, this] stored pixels
    batch_size: int  # per worker
    lr: float
    lr_decay_epochs: int
    lr_decay_gamma: float
    bn_recalibration_batches: int  # BatchNorm statistics re-estimated after every epoch
    val_short_side: int  # validation scores whole validation photos at this size
    val_max_photos: int  # a fixed, seeded subset of the validation photos
    num_workers: int
    loader_workers: int  # DataLoader processes per worker (0: decode in the training process)
    use_gpu: bool
    amp: bool
    storage_path: str
    run_name: str
    resume: bool
    max_failures: int
    seed: int
    out_dir: str

    def __post_init__(self) -> None:
        if self.val_max_photos < 1 or (self.steps_per_epoch is not None and self.steps_per_epoch < 1):
            raise ValueError("params.yaml: train.val_max_photos and train.steps_per_epoch (or null) must be >= 1")
        if self.shuffle_buffer_mb <= 0 or self.data_inflight_mb <= 0:
            raise ValueError("params.yaml: train.shuffle_buffer_mb and train.data_inflight_mb must be > 0")


@dataclass
class EvaluateParams:
    band_width: int  # BPE band in px at 256 (short side), scaled with resolution
    sizes: list[int]  # whole photos, short side
    max_photos: int  # a fixed, seeded subset of the test photos, scored at every size
    mask_seed: int  # the fixed (photo, mask) pairs
    grid_rows: int
    out_dir: str

    def __post_init__(self) -> None:
        if self.max_photos < 1:
            raise ValueError("params.yaml: evaluate.max_photos must be >= 1 (a bounded, seeded subset)")


@dataclass
class RegisterParams:
    model_name: str
    alias: str
    metric: str


@dataclass
class MlflowParams:
    tracking_uri: str
    experiment: str

    def resolved_tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI wins, so a job and the user's shell see the same store. A relative
        SQLite path is pinned to the current directory: Ray workers run elsewhere."""
        uri = os.environ.get("MLFLOW_TRACKING_URI", self.tracking_uri)
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(Path(uri[len(prefix) :]).resolve())
        return uri


@dataclass
class Params:
    corpus: CorpusParams
    data: DataParams
    masks: MaskParams
    model: ModelParams
    loss: LossParams
    train: TrainParams
    evaluate: EvaluateParams
    register: RegisterParams
    mlflow: MlflowParams

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")
# What a file with missing keys most likely is: a recipe passed as the params file.
_OVERLAY_HINT = "(a recipe is an overlay on params.yaml: pass it as `--recipe`, or load_params(recipe=...))"


def _build(cls: type[T], values: Any, where: str) -> T:
    if not isinstance(values, dict):
        raise ValueError(f"params.yaml: section '{where}' is missing (or not a mapping) {_OVERLAY_HINT}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"params.yaml: unknown key(s) {unknown} in section '{where}'")
    missing = sorted(f"{where}.{name}" for name in names - set(values))
    if missing:
        raise ValueError(f"params.yaml: missing key(s) {missing} {_OVERLAY_HINT}")
    return cls(**values)


def parse_params(raw: dict[str, Any]) -> Params:
    """Typed Params from a plain dict shaped like params.yaml: every section and key, no others."""
    sections = typing.get_type_hints(Params)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"params.yaml: unknown section(s) {unknown}")
    return Params(**{name: _build(cls, raw.get(name), name) for name, cls in sections.items()})


def _read_yaml(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text()) or {}


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None, recipe: str | Path | None = None
) -> Params:
    """Read params.yaml, merge a recipe's overlay (`recipes/*.yaml`: the keys it changes) over it,
    then `overrides` ({"train": {"epochs": 1}, ...}) over both."""
    raw = _read_yaml(path)
    for layer in (_read_yaml(recipe) if recipe is not None else {}, overrides or {}):
        for section, values in layer.items():
            raw.setdefault(section, {}).update(values)
    return parse_params(raw)
