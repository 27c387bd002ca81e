"""`params.yaml`, parsed into typed dataclasses — the only place configuration is read.

Every stage, the Tune search and the benchmarks call `load_params()`; nothing else opens the
YAML. Unknown keys are errors so a typo in params.yaml fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dfnet.losses import LossConfig
from dfnet.model import DFNet, FusionMode, Prefill, build_model


@dataclass
class CorpusParams:
    """The embedded default's photos: real photographs from Debian packages (no install)."""

    source: str = "debian"  # debian (the packages of photo-corpus.md) | sample (bundled photos, offline, fast)
    out_dir: str = "data/corpus"  # photos/ (the prepare stage's folder source), report.json
    manifest: str = "docs/corpus-manifest.tsv"  # every photo: package, path inside, licence, sha256
    download_dir: str = "data/debs"  # downloaded .deb files, kept so a rerun downloads nothing
    max_short_side: int = 768  # photos are stored no larger than this (short side)


@dataclass
class DataParams:
    # "sample", a local folder (the corpus stage's photos by default), or s3://bucket/prefix
    source: str = "data/corpus/photos"
    image_size: int = 128  # training crop side, drawn fresh every epoch from the stored photos
    store_short_side: int = 512  # photos are stored this large (short side): crops and whole-photo eval
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    shard_rows: int = 64  # photos per Parquet shard
    out_dir: str = "data/prepared"


@dataclass
class MaskParams:
    pool_size: int = 1000
    # Pool masks are drawn like whole-photo masks at this short side; a training crop gets the
    # share of one that it shows of its photo, so holes keep their whole-photo scale.
    size: int = 256
    seed: int = 0
    out: str = "data/masks.npz"


@dataclass
class ModelParams:
    preset: str = "small"
    fusion: FusionMode = "blend"
    fusion_levels: int | None = None  # None = the preset's (ablation: 1 = a single fusion block)
    alpha_init: float | None = None  # None = PyTorch's default init (the paper); e.g. 0.95: α starts near 1
    prefill: Prefill = "ns"  # ns | telea: holes pre-filled, C_k corrects the fill | none: the paper

    def build(self) -> DFNet:
        levels = {} if self.fusion_levels is None else {"fusion_levels": self.fusion_levels}
        model = build_model(self.preset, fusion=self.fusion, prefill=self.prefill, **levels)
        if self.alpha_init is not None:
            for block in model.fusion:
                if block.blend is not None:
                    block.blend.start_alpha_at(self.alpha_init)
        return model


@dataclass
class TrainParams:
    # Start from these weights (a model directory; "pretrained" = the model shipped with the
    # package) instead of a fresh initialisation; None trains from scratch.
    init_from: str | None = "pretrained"
    epochs: int = 2
    crops_per_photo: int = 4  # one pass = this many fresh crops of every training photo
    steps_per_epoch: int | None = None  # None = an epoch is one pass
    shuffle_buffer_mb: float = 8  # crops shuffled across photos, per data stream
    max_zoom_out: float = 3.0  # crop windows of image_size × [1, this] stored pixels
    batch_size: int = 16  # per worker
    lr: float = 2e-4  # fine-tuning the shipped model; the paper starts at 2e-3
    lr_decay_epochs: int = 5
    lr_decay_gamma: float = 0.1
    bn_recalibration_batches: int = 20  # BatchNorm statistics re-estimated after every epoch
    val_short_side: int = 256  # validation scores whole validation photos at this size
    val_max_photos: int = 64  # a fixed, seeded subset of the validation photos
    num_workers: int = 1
    loader_workers: int = 0  # DataLoader processes per worker (0: decode in the training process)
    use_gpu: bool = False
    amp: bool = True
    storage_path: str = "runs"
    run_name: str = "dfnet-small"
    resume: bool = True
    max_failures: int = 2
    seed: int = 0
    out_dir: str = "models/dfnet"

    def __post_init__(self) -> None:
        if self.val_max_photos < 1 or (self.steps_per_epoch is not None and self.steps_per_epoch < 1):
            raise ValueError("params.yaml: train.val_max_photos and train.steps_per_epoch (or null) must be >= 1")
        if self.shuffle_buffer_mb <= 0:
            raise ValueError("params.yaml: train.shuffle_buffer_mb must be > 0")


@dataclass
class EvaluateParams:
    band_width: int = 5  # BPE band in px at 256 (short side), scaled with resolution
    sizes: list[int] = field(default_factory=lambda: [256, 512])  # whole photos, short side
    max_photos: int = 24  # a fixed, seeded subset of the test photos, scored at every size
    mask_seed: int = 0  # the fixed (photo, mask) pairs
    grid_rows: int = 6
    out_dir: str = "metrics"

    def __post_init__(self) -> None:
        if self.max_photos < 1:
            raise ValueError("params.yaml: evaluate.max_photos must be >= 1 (a bounded, seeded subset)")


@dataclass
class RegisterParams:
    model_name: str = "dfnet"
    alias: str = "champion"
    metric: str = "bpe"


@dataclass
class MlflowParams:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "dfnet"

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
    corpus: CorpusParams = field(default_factory=CorpusParams)
    data: DataParams = field(default_factory=DataParams)
    masks: MaskParams = field(default_factory=MaskParams)
    model: ModelParams = field(default_factory=ModelParams)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")


def _build(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    values = values or {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"params.yaml: unknown key(s) {unknown} in section '{where}'")
    return cls(**values)


def parse_params(raw: dict[str, Any]) -> Params:
    """Typed Params from a plain dict shaped like params.yaml (missing keys take defaults)."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"params.yaml: unknown section(s) {unknown}")
    return Params(**{name: _build(cls, raw.get(name), name) for name, cls in sections.items()})  # type: ignore[arg-type]


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml; `overrides` ({"train": {"epochs": 1}, ...}) are merged over it."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return parse_params(raw)
