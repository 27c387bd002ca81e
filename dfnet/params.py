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
from dfnet.model import DFNet, FusionMode, build_model


@dataclass
class DataParams:
    source: str = "sample"  # "sample", a local folder, or s3://bucket/prefix
    image_size: int = 64
    crops_per_image: int = 96
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    shard_rows: int = 512
    seed: int = 0
    out_dir: str = "data/prepared"


@dataclass
class MaskParams:
    pool_size: int = 1000
    eval_per_bin: int = 6
    seed: int = 0
    out: str = "data/masks.npz"


@dataclass
class ModelParams:
    preset: str = "small"
    fusion: FusionMode = "blend"

    def build(self) -> DFNet:
        return build_model(self.preset, fusion=self.fusion)


@dataclass
class TrainParams:
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    lr_decay_epochs: int = 5
    lr_decay_gamma: float = 0.1
    num_workers: int = 1
    use_gpu: bool = False
    amp: bool = True
    storage_path: str = "runs"
    run_name: str = "dfnet-small"
    resume: bool = True
    max_failures: int = 2
    seed: int = 0
    out_dir: str = "models/dfnet"


@dataclass
class EvaluateParams:
    band_width: int = 5
    pairs_per_bin: int = 64
    grid_rows: int = 6
    out_dir: str = "metrics"


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
