"""Whole-photo scoring: the one path behind the evaluate stage, training validation, the Tune
search, the registry and `bench/heldout.py`.

Users complete whole photos at their own size, so held-out photos are scaled to a short side
(never cropped) and completed whole, each with masks drawn at that size. A photo's masks depend
only on (mask seed, photo key, short side), so adding photos never changes another's masks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dfnet.data import resize_short_side, stable_hash
from dfnet.inpaint import Inpainter
from dfnet.masks import HOLE_BINS, evaluation_masks, hole_ratio
from dfnet.metrics import band_width_for, bpe, l1_percent, psnr, ssim
from dfnet.model import CONFIG_NAME, DFNet
from dfnet.params import Params
from dfnet.pretrained import pretrained_dir, resolve_model_dir
from dfnet.storage import load_photos

__all__ = [
    "LOWER_IS_BETTER",
    "METRICS",
    "OPENCV_RADII",
    "PSNR_CAP_DB",
    "Example",
    "Heldout",
    "Method",
    "Pair",
    "Results",
    "baseline_methods",
    "better",
    "bin_label",
    "comparison_grid",
    "dfnet_method",
    "evaluate_heldout",
    "evaluate_methods",
    "evaluation_pairs",
    "mean_scores",
    "opencv_method",
    "overall_mean",
    "score",
    "split_scores",
    "stage_methods",
    "validation_scores",
]

log = logging.getLogger("dfnet.evaluation")

#: The per-image metrics `score` returns, in report order.
METRICS: tuple[str, ...] = ("l1", "bpe", "psnr", "ssim")
#: Metrics where a smaller value is the better model; every other known metric is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"l1", "bpe"})
_HIGHER_IS_BETTER: frozenset[str] = frozenset({"psnr", "ssim"})
#: PSNR of identical images is infinite; it is capped here so means and eval.json stay finite.
#: Real completions stay far below it (1% of the pixels one grey level off is ~68 dB).
PSNR_CAP_DB = 100.0
#: A method completes one photo: (image HxWx3 uint8, known HxW uint8 with 1 = known) → HxWx3 uint8.
Method = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class Pair:
    """One held-out photo at the scored size and one evaluation mask for it."""

    key: str
    bin: int  # index into HOLE_BINS
    image: np.ndarray  # HxWx3 uint8, the ground truth
    known: np.ndarray  # HxW uint8, 1 = known, 0 = hole

    @property
    def short_side(self) -> int:
        return min(self.image.shape[:2])

    @property
    def masked_input(self) -> np.ndarray:
        """What a method is given, as a person would see it: the hole painted mid grey."""
        return np.where(self.known[..., None] == 1, self.image, 128).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class Example:
    """A pair kept for the comparison grid, with every method's completion of it."""

    pair: Pair
    completions: dict[str, np.ndarray]


def bin_label(index: int) -> str:
    """The name of a hole-ratio bin ("0-10%"), the key used in results and reports."""
    lo, hi = HOLE_BINS[index]
    return f"{round(lo * 100)}-{round(hi * 100)}%"


def better(metric: str, new: float, old: float) -> bool:
    """Whether `new` beats `old` on `metric` (strictly; NaN never wins). Used by the registry so a
    PSNR or SSIM champion is replaced by a higher value, an l1 or BPE one by a lower value."""
    if metric in LOWER_IS_BETTER:
        return new < old
    if metric in _HIGHER_IS_BETTER:
        return new > old
    raise ValueError(f"unknown metric {metric!r}; known: {sorted(LOWER_IS_BETTER | _HIGHER_IS_BETTER)}")


# --------------------------------------------------------------------------------- pairs


def _photo_masks(key: str, height: int, width: int, short_side: int, seed: int) -> dict[int, np.ndarray]:
    """{bin: HxW known mask} for one photo, from a seed that no other photo's draw touches."""
    photo_seed = stable_hash(f"evaluation-masks/{seed}/{short_side}/{key}")
    return {b: masks[0] for b, masks in evaluation_masks(1, height, width, photo_seed).items()}


def evaluation_pairs(
    photos: Mapping[str, np.ndarray], short_side: int, seed: int, every_bin: bool = True
) -> list[Pair]:
    """The fixed (photo, mask) pairs of `photos` ({key: HxWx3 uint8}) scaled to `short_side`.

    every_bin=True pairs each photo with every bin's mask; False cycles the bins over the photos
    in key order, a fraction of the work with every bin still equally represented.
    """
    pairs = []
    for position, key in enumerate(sorted(photos)):
        image = resize_short_side(photos[key], short_side)
        masks = _photo_masks(key, *image.shape[:2], short_side, seed)
        bins = range(len(HOLE_BINS)) if every_bin else [position % len(HOLE_BINS)]
        pairs.extend(Pair(key, b, image, masks[b]) for b in bins)
    return pairs


# --------------------------------------------------------------------------------- scores


def _tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 → 1x3xHxW float in [0, 1], the layout of dfnet.metrics."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255


def score(completed: np.ndarray, truth: np.ndarray, known: np.ndarray, band_width_at_256: int) -> dict[str, float]:
    """l1 and BPE (percent of the 8-bit range), PSNR (dB, capped at `PSNR_CAP_DB`) and SSIM of
    one completed 8-bit photo. The BPE band is `band_width_at_256` px at a 256 px short side and
    scales with the photo's short side, so it covers the same share of a hole at every size."""
    pred, target = _tensor(completed), _tensor(truth)
    mask = torch.from_numpy(known.astype(np.float32))[None, None]
    band = band_width_for(*truth.shape[:2], width_at_256=band_width_at_256)
    return {
        "l1": float(l1_percent(pred, target)[0]),
        "bpe": float(bpe(pred, target, mask, band_width=band)[0]),
        "psnr": min(float(psnr(pred, target)[0]), PSNR_CAP_DB),
        "ssim": float(ssim(pred, target)[0]),
    }


def mean_scores(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over score rows (e.g. the bins of one method): how every caller
    condenses per-bin results into one number per metric."""
    rows = list(rows)
    if not rows:
        raise ValueError("no scores to average")
    return {metric: float(np.mean([row[metric] for row in rows])) for metric in METRICS}


# --------------------------------------------------------------------------------- methods


def dfnet_method(model: DFNet) -> Method:
    """A DFNet through `Inpainter` on the model's own device: whole photos, as users run it."""
    inpainter = Inpainter(model, next(model.parameters()).device)

    def complete(image: np.ndarray, known: np.ndarray) -> np.ndarray:
        return np.array(inpainter.inpaint(image, known * 255, mask_convention="known-white"))

    return complete


def opencv_method(flag: int, radius: int = 3) -> Method:
    """OpenCV inpainting (`cv2.INPAINT_TELEA` or `cv2.INPAINT_NS`) with the given radius."""

    def complete(image: np.ndarray, known: np.ndarray) -> np.ndarray:
        return cv2.inpaint(np.ascontiguousarray(image), (known == 0).astype(np.uint8), radius, flag)

    return complete


def _example_indices(pairs: Sequence[Pair], rows: int) -> list[int]:
    """Row r shows bin r mod 5 on a different photo for each row (while there are enough)."""
    by_bin: dict[int, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_bin.setdefault(pair.bin, []).append(index)
    bins = sorted(by_bin)
    if not bins:
        return []
    picks = []
    for r in range(rows):
        candidates = by_bin[bins[r % len(bins)]]
        picks.append(candidates[r * len(candidates) // rows])
    return picks


def evaluate_methods(
    methods: Mapping[str, Method], pairs: Sequence[Pair], band_width: int, examples: int = 0
) -> tuple[dict[str, dict[str, dict[str, float]]], list[Example]]:
    """Run every method on every pair and average the scores per bin.

    Returns ({method: {bin label: {metric: mean over the bin's pairs}}}, the `examples` pairs
    picked for a comparison grid with each method's completion). Bins without pairs are left out.
    """
    keep = _example_indices(pairs, examples)
    completions: dict[int, dict[str, np.ndarray]] = {index: {} for index in keep}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, method in methods.items():
        results[name] = {}
        for b in sorted({pair.bin for pair in pairs}):
            start = time.perf_counter()
            rows = []
            for index, pair in enumerate(pairs):
                if pair.bin != b:
                    continue
                completed = method(pair.image, pair.known)
                rows.append(score(completed, pair.image, pair.known, band_width))
                if index in completions:
                    completions[index][name] = completed
            means = mean_scores(rows)
            results[name][bin_label(b)] = means
            log.info(
                "%-10s %4d px %-7s %2d photos %s (%.1fs)", name, pairs[0].short_side, bin_label(b), len(rows),
                " ".join(f"{k}={v:.3f}" for k, v in means.items()), time.perf_counter() - start,
            )  # fmt: skip
    return results, [Example(pairs[index], completions[index]) for index in keep]


def split_scores(
    methods: Mapping[str, Method],
    data_dir: str,
    split: str,
    short_side: int,
    band_width: int,
    seed: int,
    max_photos: int,
    examples: int = 0,
    every_bin: bool = False,
) -> tuple[dict[str, dict[str, dict[str, float]]], list[Example], int]:
    """Score `methods` on a prepared split's photos at `short_side`: the one path behind the
    evaluate stage (test photos), training validation (val photos) and the Tune search.

    Returns (per-bin scores as `evaluate_methods` gives them, the grid's examples, photos scored).
    """
    photos = load_photos(data_dir, split, short_side, max_photos, seed)
    if not photos:
        return {name: {} for name in methods}, [], 0
    # With under two photos per bin, cycling bins would leave bins empty or resting on one
    # photo: then every photo meets every bin.
    all_bins = every_bin or len(photos) < 2 * len(HOLE_BINS)
    pairs = evaluation_pairs(photos, short_side, seed, every_bin=all_bins)
    per_bin, picked = evaluate_methods(methods, pairs, band_width, examples=examples)
    return per_bin, picked, len(photos)


def validation_scores(model: DFNet, params: Params) -> dict[str, float]:
    """Mean l1, BPE, PSNR and SSIM of `model` on the validation photos at `train.val_short_side`,
    scored exactly as the evaluate stage scores the test photos (same pairs, band and 8-bit
    completions). The model's train/eval mode is restored afterwards."""
    t, ev = params.train, params.evaluate
    was_training = model.training
    try:
        per_bin, _, photos = split_scores(
            {"dfnet": dfnet_method(model)}, params.data.out_dir, "val", t.val_short_side,
            ev.band_width, ev.mask_seed, t.val_max_photos,
        )  # fmt: skip
    finally:
        model.train(was_training)
    return mean_scores(per_bin["dfnet"].values()) if photos else {}


# --------------------------------------------------------------------------------- held-out

#: {method: {size: {bin label: {metric: mean}}}}, sizes as strings (JSON keys).
Results = dict[str, dict[str, dict[str, dict[str, float]]]]
#: OpenCV radii of `bench/heldout.py`. The stage scores radius 3 only: the fill's cost grows with
#: the radius and the larger one scored about the same.
OPENCV_RADII = (3, 5)


def baseline_methods(radii: tuple[int, ...] = (3,)) -> dict[str, Method]:
    """OpenCV Telea and Navier–Stokes at each radius, named "telea" and "ns" at radius 3 and
    "telea_r5", "ns_r5", ... at the others."""
    methods = {}
    for name, flag in (("telea", cv2.INPAINT_TELEA), ("ns", cv2.INPAINT_NS)):
        for radius in radii:
            methods[name if radius == 3 else f"{name}_r{radius}"] = opencv_method(flag, radius)
    return methods


def stage_methods(params: Params, model_dir: str | Path, radii: tuple[int, ...] = (3,)) -> dict[str, Method]:
    """What the evaluate stage and `bench/heldout.py` compare: the trained model, the shipped
    one (unless that is `model_dir`), the untrained network (with `model.prefill` it returns its
    pre-fill) and the OpenCV baselines at `radii`."""

    torch.manual_seed(params.train.seed)
    untrained = DFNet.from_params(params.model).eval()
    shipped = pretrained_dir()
    compare_shipped = (shipped / CONFIG_NAME).is_file() and resolve_model_dir(model_dir).resolve() != shipped.resolve()
    return {
        "dfnet": dfnet_method(DFNet.from_pretrained(model_dir)),
        **({"shipped": dfnet_method(DFNet.from_pretrained(shipped))} if compare_shipped else {}),
        "untrained": dfnet_method(untrained),
        **baseline_methods(radii),
    }


@dataclass
class Heldout:
    """What `evaluate_heldout` measured."""

    results: Results
    examples: list[Example]  # `grid_rows` per size, for the comparison grid
    photos: dict[str, int]  # test photos scored per size


def evaluate_heldout(
    params: Params, methods: dict[str, Method], grid_rows: int = 0, every_bin: bool = False
) -> Heldout:
    """Score `methods` on the test photos at every `evaluate.sizes` short side, each photo with one
    bin's mask (the stage, the Tune search, the registry) or, with `every_bin`, with every bin's."""
    ev = params.evaluate
    heldout = Heldout({name: {} for name in methods}, [], {})
    for size in ev.sizes:
        per_bin, examples, photos = split_scores(
            methods, params.data.out_dir, "test", size, ev.band_width, ev.mask_seed, ev.max_photos, grid_rows, every_bin
        )
        for name in methods:
            heldout.results[name][str(size)] = per_bin[name]
        heldout.examples.extend(examples)
        heldout.photos[str(size)] = photos
    return heldout


def overall_mean(per_size: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """One method's metrics averaged over every size and bin: the number the registry compares."""
    return mean_scores(scores for bins in per_size.values() for scores in bins.values())


# --------------------------------------------------------------------------------- grid

_MAX_ASPECT = 2.0  # cells are at most this many display heights wide; wider photos are shrunk
_GAP = 4
_HEADER = 22
_CAPTION = 18


def _display(image: np.ndarray, height: int, max_width: int) -> Image.Image:
    """`image` scaled to `height` px (or less, when that would exceed `max_width`)."""
    h, w = image.shape[:2]
    scale = min(height / h, max_width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)


def comparison_grid(examples: Sequence[Example], methods: Sequence[str], height: int = 192) -> Image.Image:
    """One row per example: the input with its hole in grey | each method | ground truth.

    Whole photos of any aspect are scaled to a common display `height` and centred in equal
    cells, so columns line up; each row is captioned with its photo, size and hole ratio.
    """
    if not examples:
        raise ValueError("no examples to draw")
    columns = ["input", *methods, "truth"]
    cell_w = min(
        round(_MAX_ASPECT * height),
        max(round(e.pair.image.shape[1] * height / e.pair.image.shape[0]) for e in examples),
    )
    row_h = _CAPTION + height + _GAP
    canvas = Image.new("RGB", (len(columns) * (cell_w + _GAP) + _GAP, _HEADER + len(examples) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    for c, name in enumerate(columns):
        draw.text((_GAP + c * (cell_w + _GAP) + cell_w // 2, _HEADER // 2), name, fill="black", font=font, anchor="mm")
    for r, example in enumerate(examples):
        pair = example.pair
        top = _HEADER + r * row_h
        ratio = hole_ratio(pair.known)
        caption = f"{pair.key}   {pair.short_side} px short side   hole {ratio:.1%} (bin {bin_label(pair.bin)})"
        draw.text((_GAP, top + 2), caption, fill="dimgray", font=small)
        images = [pair.masked_input, *(example.completions[m] for m in methods), pair.image]
        for c, image in enumerate(images):
            cell = _display(image, height, cell_w)
            left = _GAP + c * (cell_w + _GAP) + (cell_w - cell.width) // 2
            canvas.paste(cell, (left, top + _CAPTION + (height - cell.height) // 2))
    return canvas
