"""Whole-photo evaluation (dfnet/evaluation.py) and the evaluate stage on a tiny prepared split.

The split is written here: a few smooth synthetic photos of different aspect ratios, stored as
JPEG rows of `dfnet.storage.PARQUET_SCHEMA`, the way the prepare stage stores them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dfnet.data import encode_jpeg
from dfnet.evaluation import (
    METRICS,
    PSNR_CAP_DB,
    better,
    bin_label,
    comparison_grid,
    dfnet_method,
    evaluate_heldout,
    evaluate_methods,
    evaluation_pairs,
    opencv_method,
    overall_mean,
    score,
    validation_scores,
)
from dfnet.masks import HOLE_BINS, hole_ratio
from dfnet.model import build_model
from dfnet.params import load_params
from dfnet.storage import PARQUET_SCHEMA

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "a-wide.jpg": (96, 128),
    "b-tall.jpg": (128, 80),
    "c-pano.jpg": (72, 144),
    "d-square.jpg": (100, 100),
    "e-wide.jpg": (90, 120),
    "f-tall.jpg": (120, 90),
}
LABELS = [bin_label(b) for b in range(len(HOLE_BINS))]


def smooth_photo(height: int, width: int, phase: float) -> np.ndarray:
    """Low-frequency colour waves: what diffusion-style inpainting should fill well."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        128 + 90 * np.sin(2 * math.pi * x / width + phase),
        128 + 90 * np.cos(2 * math.pi * y / height + phase),
        40 + 160 * (x + y) / (width + height),
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


PHOTOS = {key: smooth_photo(h, w, i) for i, (key, (h, w)) in enumerate(SHAPES.items())}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny images gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    waiting threads make every torch call many times slower."""
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv2_threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared data folder whose test split holds the PHOTOS, one row each, in key order, and
    whose validation split holds the same photos under the same keys (so the same pairs)."""
    root = tmp_path_factory.mktemp("prepared")
    for split in ("test", "val"):
        rows = [
            {"key": k, "source": k, "split": split, "image": encode_jpeg(p), "height": p.shape[0], "width": p.shape[1]}
            for k, p in PHOTOS.items()
        ]
        (root / split).mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), root / split / "part-0.parquet")
    return root


def masks_by_pair(pairs: list) -> dict[tuple[str, int], np.ndarray]:
    return {(p.key, p.bin): p.known for p in pairs}


def test_pairs_are_fixed_and_do_not_depend_on_other_photos():
    first = masks_by_pair(evaluation_pairs(PHOTOS, 64, seed=0))
    again = masks_by_pair(evaluation_pairs(PHOTOS, 64, seed=0))
    extra = {**PHOTOS, "0-new.jpg": smooth_photo(90, 120, 7.0)}  # sorts first: positions shift
    grown = masks_by_pair(evaluation_pairs(extra, 64, seed=0))
    other_seed = masks_by_pair(evaluation_pairs(PHOTOS, 64, seed=1))

    assert set(first) == {(k, b) for k in PHOTOS for b in range(len(HOLE_BINS))}
    assert all(np.array_equal(first[pair], again[pair]) for pair in first)
    assert all(np.array_equal(first[pair], grown[pair]) for pair in first)
    assert not all(np.array_equal(first[pair], other_seed[pair]) for pair in first)


@pytest.mark.parametrize("size", [64, 256])
def test_every_mask_is_drawn_at_the_photo_size_with_a_hole_ratio_in_its_bin(size: int):
    for pair in evaluation_pairs(PHOTOS, size, seed=3):
        lo, hi = HOLE_BINS[pair.bin]
        assert pair.known.shape == pair.image.shape[:2]
        assert pair.short_side == size
        assert lo < hole_ratio(pair.known) < hi, (pair.key, size, pair.bin)
        assert set(np.unique(pair.known)) == {0, 1}


def test_one_bin_per_photo_cycles_the_bins_over_the_sorted_keys():
    photos = {f"{i:02d}.jpg": smooth_photo(64, 96, i) for i in range(7)}
    every = masks_by_pair(evaluation_pairs(photos, 64, seed=0))
    pairs = evaluation_pairs(photos, 64, seed=0, every_bin=False)

    assert [(p.key, p.bin) for p in pairs] == [(k, i % len(HOLE_BINS)) for i, k in enumerate(sorted(photos))]
    assert all(np.array_equal(p.known, every[(p.key, p.bin)]) for p in pairs)


def test_score_of_a_perfect_and_of_an_imperfect_completion():
    pair = evaluation_pairs(PHOTOS, 64, seed=0)[2]
    perfect = score(pair.image, pair.image, pair.known, 5)
    assert set(perfect) == set(METRICS)
    assert perfect["l1"] == 0 and perfect["bpe"] == 0
    assert perfect["psnr"] == PSNR_CAP_DB
    assert perfect["ssim"] == pytest.approx(1.0)

    worse = score(pair.masked_input, pair.image, pair.known, 5)
    assert worse["l1"] > 0 and worse["bpe"] > 0
    assert worse["psnr"] < PSNR_CAP_DB and worse["ssim"] < 1


def test_telea_beats_a_black_fill_on_a_smooth_photo():
    pairs = [p for p in evaluation_pairs(PHOTOS, 128, seed=0) if p.bin == 3]

    def black(image: np.ndarray, known: np.ndarray) -> np.ndarray:
        return image * known[..., None]

    results, _ = evaluate_methods({"telea": opencv_method(cv2.INPAINT_TELEA), "black": black}, pairs, 5)
    telea, fill = results["telea"][LABELS[3]], results["black"][LABELS[3]]
    assert telea["l1"] < fill["l1"] / 2
    assert telea["bpe"] < fill["bpe"] / 2
    assert telea["psnr"] > fill["psnr"]


def test_better_knows_the_direction_of_every_metric():
    assert better("psnr", 30, 20) and not better("psnr", 20, 30)
    assert better("ssim", 0.9, 0.8) and not better("ssim", 0.8, 0.9)
    assert better("bpe", 1, 2) and not better("bpe", 2, 1)
    assert better("l1", 1, 2) and better("bpe", 1, 2)
    assert not better("bpe", 1, 1)
    assert not better("l1", float("nan"), 2)
    with pytest.raises(ValueError, match="unknown metric"):
        better("accuracy", 1, 2)


def test_grid_has_one_row_per_example_from_different_photos_and_bins():
    pairs = evaluation_pairs(PHOTOS, 64, seed=0)
    methods = {"telea": opencv_method(cv2.INPAINT_TELEA), "ns": opencv_method(cv2.INPAINT_NS)}
    _, examples = evaluate_methods(methods, pairs, 5, examples=4)
    heights = {n: comparison_grid(examples[:n], list(methods), height=100).height for n in (1, 2, 4)}
    grid = comparison_grid(examples, list(methods), height=100)

    assert len(examples) == 4
    assert len({e.pair.key for e in examples}) == 4
    assert len({e.pair.bin for e in examples}) == 4
    assert all(set(e.completions) == set(methods) for e in examples)
    # Every row adds the same height, a display height plus its caption: 4 rows, stacked.
    row = heights[2] - heights[1]
    assert 100 < row < 150 and heights[4] == heights[1] + 3 * row
    # Four columns (input, two methods, truth) of cells no wider than two display heights.
    assert 4 * 100 < grid.width <= 4 * (2 * 100 + 10)
    # Each row shows its own photo: the truth cells of two rows differ.
    pixels = np.asarray(grid)
    assert not np.array_equal(pixels[heights[1] - row : heights[1]], pixels[heights[2] - row : heights[2]])


def test_validation_and_evaluate_score_the_same_model_and_pairs_the_same(prepared: Path):
    """Training validation and the evaluate stage (and so Tune and the registry, which read it)
    are one scoring: the configured BPE band, 8-bit completions, the same pairs."""
    torch.manual_seed(0)
    model = build_model("small").train()
    params = load_params(REPO / "params.yaml", {
        "data": {"out_dir": str(prepared)},
        "train": {"val_short_side": 64, "val_max_photos": 5},
        "evaluate": {"sizes": [64], "max_photos": 5, "band_width": 9, "mask_seed": 3},
    })  # fmt: skip
    validation = validation_scores(model, params)
    assert model.training  # validation leaves the training mode as it found it

    assert set(validation) == set(METRICS)
    assert all(math.isfinite(v) for v in validation.values())
    assert 0 < validation["l1"] < 100 and 0 < validation["ssim"] < 1
    assert overall_mean(evaluate_heldout(params, {"dfnet": dfnet_method(model)}).results["dfnet"]) == validation
    # The band is the configured one: another band width gives another BPE.
    params.evaluate.band_width = 2
    assert validation_scores(model, params)["bpe"] != validation["bpe"]


def test_evaluate_stage_writes_every_method_size_and_bin(prepared: Path, tmp_path: Path):
    from pipelines.evaluate import main

    torch.manual_seed(1)
    build_model("small").save_pretrained(tmp_path / "model")
    params = load_params(REPO / "params.yaml", {
        "data": {"out_dir": str(prepared)},
        "model": {"preset": "small"},
        "train": {"out_dir": str(tmp_path / "model"), "seed": 0},
        "evaluate": {"sizes": [64, 128], "max_photos": 5, "grid_rows": 2, "out_dir": str(tmp_path / "metrics")},
    })  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    main(["--params", str(tmp_path / "params.yaml")])

    out = tmp_path / "metrics"
    evaluation = json.loads((out / "eval.json").read_text())
    methods = ["dfnet", "shipped", "untrained", "telea", "ns"]  # shipped: the package's pretrained model
    assert set(evaluation) == {*methods, "settings"}
    for method in methods:
        assert set(evaluation[method]) == {"64", "128", "mean"}
        for size in ("64", "128"):
            assert list(evaluation[method][size]) == LABELS
            for label in LABELS:
                assert all(math.isfinite(evaluation[method][size][label][k]) for k in METRICS)
        every_bpe = [evaluation[method][s][b]["bpe"] for s in ("64", "128") for b in LABELS]
        assert evaluation[method]["mean"]["bpe"] == pytest.approx(np.mean(every_bpe))
    assert evaluation["settings"]["photos_per_size"] == {"64": 5, "128": 5}

    with open(out / "eval_bins.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["size"], r["hole_ratio"]) for r in rows] == [(s, b) for s in ("64", "128") for b in LABELS]
    assert float(rows[0]["telea_l1"]) == pytest.approx(evaluation["telea"]["64"][LABELS[0]]["l1"], abs=1e-4)
    for name in ("eval_metrics.png", "eval_grid.png"):
        assert (out / name).stat().st_size > 1000


def test_registry_promotes_a_higher_psnr_and_keeps_it_over_a_lower_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mlflow = pytest.importorskip("mlflow")
    from tracking.registry import ensure_experiment, register_model

    monkeypatch.chdir(tmp_path)  # artifacts land here, never in the repository
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow keeps the active experiment and tracking URI process-wide: undo both afterwards, or a
    # later test's fresh store is asked for this store's experiment.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")  # set_experiment exports it; undone afterwards
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(uri, "evaluation-test"))
    model_dir = build_model("small").save_pretrained(tmp_path / "model")

    def promoted(value: float) -> bool:
        try:
            return register_model(model_dir, "by-psnr", "champion", "psnr", value).promoted
        finally:
            mlflow.end_run()

    # Higher PSNR wins (lower-is-better metrics are covered by `better` above and test_serve).
    assert [promoted(v) for v in (20.0, 30.0, 25.0)] == [True, True, False]
