"""The one training loop (`dfnet.training`) and its data stream, as a plain PyTorch program.

No Ray here: the Ray Train worker calls the same `train()` (tests/test_train.py covers that).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dfnet.masks import mask_pool, save_masks
from dfnet.model import DFNet
from dfnet.params import Params, load_params
from dfnet.train_data import photo_id
from dfnet.training import (
    BatchSource,
    checkpoint_state,
    code_version,
    epoch_batches,
    plain_batches,
    recalibrate_batchnorm,
    run_identity,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def _photos(count: int, seed: int = 0) -> list[np.ndarray]:
    """Photos that are told apart by colour: each a flat colour plus a little noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (count, 3))
    return [np.clip(c + rng.normal(0, 4, (96, 128, 3)), 0, 255).astype(np.uint8) for c in colours]


def _params(root: Path, **train: object) -> Params:
    return load_params(
        REPO / "params.yaml",
        {
            "data": {"out_dir": str(root / "prepared"), "image_size": SIZE},
            "masks": {"out": str(root / "masks.npz")},
            "model": {"prefill": "none"},  # the paper's network, trained from scratch
            "loss": {"p": 4, "q": 2, "texture_fallback": "off"},
            "train": {
                "batch_size": 8,
                "crops_per_photo": 2,
                "epochs": 1,
                "val_max_photos": 2,
                "init_from": None,
                **train,
            },
            "evaluate": {"grid_rows": 2},
        },
    )


@pytest.fixture
def data_root(tmp_path: Path, prepared_split) -> Path:
    prepared_split(tmp_path / "prepared", "train", _photos(24), shard_rows=5)
    prepared_split(tmp_path / "prepared", "val", _photos(2, seed=1))
    (tmp_path / "prepared" / "report.json").write_text(json.dumps({"photos": 26}))
    save_masks(tmp_path / "masks.npz", {"pool": mask_pool(30, SIZE, SIZE, seed=0)})
    return tmp_path


def _source(root: Path, **train: object) -> BatchSource:
    # A buffer of 32 crops (16 photos' worth): batches must mix photos through a small buffer too.
    return plain_batches(_params(root, seed=3, shuffle_buffer_mb=32 * 4 * SIZE * SIZE / 2**20, **train))


def _keys(count: int) -> dict[int, str]:
    return {photo_id(f"train/{i:04d}.png"): f"train/{i:04d}.png" for i in range(count)}


def test_every_batch_mixes_photos_and_an_epoch_is_one_pass(data_root: Path) -> None:
    seen: Counter[int] = Counter()
    for images, masks, photos in epoch_batches(_source(data_root), 0, None):
        assert images.shape == (8, 3, SIZE, SIZE) and masks.shape == (8, 1, SIZE, SIZE)
        assert images.dtype == masks.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
        # A batch of crops of one photo is what made BatchNorm strip colours: never again.
        assert len(set(photos.tolist())) >= 4, f"batch drawn from too few photos: {photos.tolist()}"
        # Colour statistics differ inside a batch (one photo's crops would share them).
        assert images.mean(dim=(2, 3)).std(dim=0).max() > 0.1
        seen.update(photos.tolist())
    assert set(seen) == set(_keys(24)) and set(seen.values()) == {2}  # every photo, crops_per_photo times


def test_each_epoch_reshuffles_and_redraws_crops_and_masks(data_root: Path) -> None:
    source = _source(data_root)
    first_images, first_masks, first_order = next(iter(source(0, 0)))
    again_images, _, again_order = next(iter(source(0, 0)))
    assert torch.equal(first_order, again_order) and torch.equal(first_images, again_images)  # seeded
    for other in (source(1, 0), source(0, 1)):  # another epoch, or another pass of one epoch
        _, other_masks, other_order = next(iter(other))
        assert not torch.equal(first_order, other_order)
        assert not torch.equal(first_masks, other_masks)


def test_loader_processes_share_the_shards_and_see_every_photo(data_root: Path) -> None:
    seen: Counter[int] = Counter()
    for _, _, photos in epoch_batches(_source(data_root, loader_workers=2), 0, None):
        seen.update(photos.tolist())
    # Two processes over five shards (3 and 2): each batches its own crops, so drop_last costs
    # each at most one partial batch; no crop comes twice.
    assert set(seen) <= set(_keys(24)) and set(seen.values()) <= {1, 2}
    assert 48 - 2 * 7 <= sum(seen.values()) <= 48 and sum(seen.values()) % 8 == 0 and len(seen) >= 20


def test_an_epoch_of_fixed_steps_goes_on_into_further_passes(data_root: Path) -> None:
    source = _source(data_root)
    one_pass = [photos for _, _, photos in epoch_batches(source, 0, None)]
    assert len(one_pass) == 6  # 24 photos x 2 crops in batches of 8
    ten = [photos for _, _, photos in epoch_batches(source, 0, 10)]
    assert len(ten) == 10
    assert all(torch.equal(a, b) for a, b in zip(ten, one_pass))  # the first pass, then a fresh one
    assert not torch.equal(ten[6], one_pass[0])
    assert [len(list(epoch_batches(source, 0, n))) for n in (1, 3)] == [1, 3]


def test_an_empty_training_split_is_a_clear_error(tmp_path: Path, prepared_split) -> None:
    prepared_split(tmp_path / "prepared", "train", [])
    save_masks(tmp_path / "masks.npz", {"pool": mask_pool(3, SIZE, SIZE, seed=0)})
    with pytest.raises(ValueError, match="no full batch"):
        next(epoch_batches(_source(tmp_path), 0, 5))


def test_recalibrated_batchnorm_averages_over_all_batches() -> None:
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm2d(3)

        def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            return self.norm(images)

    batches = [(torch.full((2, 3, 4, 4), float(v)), torch.ones(2, 1, 4, 4), torch.zeros(2)) for v in (1, 2, 3, 10)]
    probe = Probe()
    recalibrate_batchnorm(probe, batches, 3, device=torch.device("cpu"))
    # A plain mean of the first three batch means; momentum 0.1 would have given 0.56.
    assert torch.allclose(probe.norm.running_mean, torch.full((3,), 2.0))
    assert probe.norm.momentum == 0.1  # restored for further training


def test_resume_continues_the_same_run(data_root: Path) -> None:
    # Epochs of 4 steps (shorter than a pass of 6): a resumed run must go on with epoch 1's
    # batches, not start the data over, to end with the same weights.
    reports: list[dict] = []
    straight = train(_params(data_root, epochs=2, steps_per_epoch=4), on_epoch=lambda m, s: reports.append(m))
    assert [r["epoch"] for r in reports] == [0, 1] and {"val_l1", "val_bpe"} <= set(reports[-1])
    assert all(0 <= h["data_wait"] < 1 for h in straight["history"] if "data_wait" in h)
    half = train(_params(data_root, epochs=1, steps_per_epoch=4))
    resumed = train(_params(data_root, epochs=2, steps_per_epoch=4), resume=checkpoint_state(half))
    assert resumed["step"] == straight["step"] == 2 * half["step"] == 8
    for key, value in straight["model"].items():
        assert torch.allclose(value.float(), resumed["model"][key].float(), atol=1e-5), key


def test_run_identity_follows_code_and_data(data_root: Path) -> None:
    params = _params(data_root)
    name = run_identity(params)
    assert name == run_identity(_params(data_root, epochs=5))  # more epochs extend the run
    assert name != run_identity(_params(data_root, lr=1e-4))
    (data_root / "prepared" / "report.json").write_text(json.dumps({"photos": 27}))
    assert run_identity(params) != name  # new data: a new run, not stale weights
    assert len(code_version()) == 12


def _flat(colour: np.ndarray, side: int) -> torch.Tensor:
    return torch.tensor(colour / 255.0, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, side, side).contiguous()


@pytest.mark.slow
def test_short_training_on_flat_colours_learns_to_carry_context_into_holes(tmp_path: Path, prepared_split) -> None:
    """A context-blind model (one fill for every photo: what batches of one photo produced)
    fails this; a model that learned to use the surrounding pixels passes."""
    rng = np.random.default_rng(0)
    train_colours = rng.integers(0, 256, (48, 3))
    prepared_split(tmp_path / "prepared", "train", [np.full((80, 80, 3), c, np.uint8) for c in train_colours])
    prepared_split(tmp_path / "prepared", "val", [np.full((64, 64, 3), train_colours[0], np.uint8)])
    (tmp_path / "prepared" / "report.json").write_text("{}")
    save_masks(tmp_path / "masks.npz", {"pool": mask_pool(50, SIZE, SIZE, seed=0)})
    params = _params(tmp_path, epochs=12, crops_per_photo=8, batch_size=16, lr=5e-3, lr_decay_epochs=8)
    torch.manual_seed(0)
    state = train(params, log_every=1000)
    model = DFNet.from_params(params.model)
    model.load_state_dict(state["model"])
    model.eval()

    errors, constant_errors = [], []
    known = torch.ones(1, 1, SIZE, SIZE)
    known[..., 20:44, 16:48] = 0
    hole = known[0, 0] == 0
    for colour in np.random.default_rng(1).integers(0, 256, (8, 3)):  # colours it never saw
        image = _flat(colour, SIZE)
        filled = model.complete(image, known)[0]
        errors.append(float((filled - image[0])[:, hole].abs().mean()) * 255)
        # The best a context-blind model can do: one fill, the training colours' mean.
        constant_errors.append(float(np.abs(train_colours.mean(0) - colour).mean()))
    assert np.mean(errors) < 0.5 * np.mean(constant_errors), (errors, constant_errors)
    assert np.mean(errors) < 20, errors
