"""DVC stage `evaluate`: the trained DFNet against classical baselines on fixed test pairs.

    python -m pipelines.evaluate [--params params.yaml]

For every hole-ratio bin, `pairs_per_bin` (test crop, evaluation mask) pairs — the same pairs on
every run — are completed by each method: the trained DFNet, the same architecture untrained
(shows what training bought), and OpenCV's Telea and Navier–Stokes inpainting. Completions are
8-bit images, as a user gets them. Writes metrics/eval.json (`dvc metrics show`),
metrics/eval_bins.csv (`dvc plots show`), metrics/eval_metrics.png and metrics/eval_grid.png.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw

from dfnet.data import decode_png_batch, read_split
from dfnet.inpaint import Inpainter
from dfnet.masks import HOLE_BINS, load_masks
from dfnet.metrics import bpe, default_band_width, fid, l1_percent, psnr, ssim
from dfnet.model import DFNet
from dfnet.params import Params
from pipelines import stage_params

log = logging.getLogger("dfnet.evaluate")
# A method maps (images NHW3 uint8, known masks NHW uint8 1 = known) to completed NHW3 uint8.
Method = Callable[[np.ndarray, np.ndarray], np.ndarray]
METRICS = ("l1", "bpe", "psnr", "ssim")


def dfnet_method(model: DFNet) -> Method:
    inpainter = Inpainter(model, max_batch=32)

    def run(images: np.ndarray, known: np.ndarray) -> np.ndarray:
        out = inpainter.inpaint_batch(list(images), list(known * 255), mask_convention="known-white", strategy="pad")
        return np.stack([np.asarray(o) for o in out])

    return run


def opencv_method(flag: int, radius: int = 3) -> Method:
    def run(images: np.ndarray, known: np.ndarray) -> np.ndarray:
        holes = (known == 0).astype(np.uint8)
        return np.stack([cv2.inpaint(img, hole, radius, flag) for img, hole in zip(images, holes)])

    return run


def evaluation_pairs(params: Params) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{bin: (images, known masks)}: test crops cycled against the bin's fixed masks."""
    table = read_split(params.data.out_dir, "test")
    images = decode_png_batch(table.column("image").to_pylist())
    masks = load_masks(params.masks.out)
    pairs = {}
    for b in range(len(HOLE_BINS)):
        bin_masks = masks[f"eval_bin{b}"]
        n = min(params.evaluate.pairs_per_bin, len(images))
        # Step through the test crops so every bin sees crops from every test photo.
        picks = np.linspace(0, len(images) - 1, n).round().astype(int)
        pairs[b] = (images[picks], np.stack([bin_masks[i % len(bin_masks)] for i in range(n)]))
    return pairs


def score(completed: np.ndarray, images: np.ndarray, known: np.ndarray, band_width: int) -> dict[str, float]:
    pred = torch.from_numpy(completed).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mask = torch.from_numpy(known[:, None].astype(np.float32))
    band = default_band_width(*images.shape[1:3], width_at_256=band_width)
    return {
        "l1": float(l1_percent(pred, target).mean()),
        "bpe": float(bpe(pred, target, mask, band_width=band).nanmean()),
        "psnr": float(psnr(pred, target).mean()),
        "ssim": float(ssim(pred, target).mean()),
    }


def evaluate(params: Params, methods: dict[str, Method]) -> tuple[dict, dict]:
    """Scores {method: {bin_label: {metric: value}}} and the completions of the grid examples."""
    pairs = evaluation_pairs(params)
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in methods}
    examples: dict[str, list[np.ndarray]] = {"input": [], "truth": [], **{name: [] for name in methods}}
    fid_status = {"available": False, "reason": "no method evaluated"}
    for b, (images, known) in pairs.items():
        label = bin_label(b)
        example = b * len(images) // len(pairs)  # a different test crop in each row of the grid
        for name, method in methods.items():
            start = time.perf_counter()
            completed = method(images, known)
            scores = score(completed, images, known, params.evaluate.band_width)
            real = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            fake = torch.from_numpy(completed).permute(0, 3, 1, 2).float() / 255
            fid_result = fid(fake, real)
            scores["fid"] = fid_result.value if fid_result.available else None
            fid_status = {"available": fid_result.available, "reason": fid_result.reason}
            results[name][label] = scores
            examples[name].append(completed[example])
            log.info("%-9s %s %s (%.1fs)", name, label, _fmt(scores), time.perf_counter() - start)
        examples["input"].append(np.where(known[example, ..., None] == 1, images[example], 128).astype(np.uint8))
        examples["truth"].append(images[example])
    results["_fid"] = fid_status  # type: ignore[assignment]
    return results, examples


def bin_label(b: int) -> str:
    lo, hi = HOLE_BINS[b]
    return f"{int(lo * 100)}-{int(hi * 100)}%"


def _fmt(scores: dict[str, float | None]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in scores.items() if v is not None)


def write_reports(results: dict, examples: dict, out_dir: Path, band_width: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in results if not m.startswith("_")]
    summary = {
        m: {**results[m], "mean": {k: float(np.mean([results[m][b][k] for b in results[m]])) for k in METRICS}}
        for m in methods
    }
    summary["settings"] = {"bpe_band_px_at_256": band_width, "fid": results["_fid"]}
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")

    labels = [bin_label(b) for b in range(len(HOLE_BINS))]
    with open(out_dir / "eval_bins.csv", "w") as f:
        f.write("hole_ratio," + ",".join(f"{m}_{k}" for k in METRICS for m in methods) + "\n")
        for label in labels:
            f.write(label + "," + ",".join(f"{results[m][label][k]:.4f}" for k in METRICS for m in methods) + "\n")

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS):
        for m in methods:
            ax.plot(labels, [results[m][label][metric] for label in labels], "o-", label=m)
        ax.set(title=metric, xlabel="hole ratio")
        ax.tick_params(axis="x", labelrotation=30)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "eval_metrics.png", dpi=110)
    plt.close(fig)

    comparison_grid(examples, [*methods]).save(out_dir / "eval_grid.png")


def comparison_grid(examples: dict[str, list[np.ndarray]], methods: list[str]) -> Image.Image:
    """One row per example: input with hole | each method | ground truth, labelled columns."""
    columns = ["input", *methods, "truth"]
    rows = [np.concatenate([examples[c][r] for c in columns], axis=1) for r in range(len(examples["truth"]))]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    side = examples["truth"][0].shape[0]
    scale = max(1, 128 // side)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    header = Image.new("RGB", (grid.width, 18), "white")
    draw = ImageDraw.Draw(header)
    for i, name in enumerate(columns):
        draw.text((i * side * scale + 4, 3), name, fill="black")
    canvas = Image.new("RGB", (grid.width, grid.height + 18), "white")
    canvas.paste(header, (0, 0))
    canvas.paste(grid, (0, 18))
    return canvas


def print_table(results: dict) -> None:
    methods = [m for m in results if not m.startswith("_")]
    labels = [bin_label(b) for b in range(len(HOLE_BINS))]
    print(f"\n| method | metric | {' | '.join(labels)} |")
    print("|---|---|" + "---|" * len(labels))
    for metric in METRICS:
        for m in methods:
            print(f"| {m} | {metric} | " + " | ".join(f"{results[m][label][metric]:.3f}" for label in labels) + " |")


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    torch.manual_seed(params.train.seed)
    methods = {
        "dfnet": dfnet_method(DFNet.from_pretrained(params.train.out_dir)),
        "untrained": dfnet_method(params.model.build().eval()),
        "telea": opencv_method(cv2.INPAINT_TELEA),
        "ns": opencv_method(cv2.INPAINT_NS),
    }
    results, examples = evaluate(params, methods)
    write_reports(results, examples, Path(params.evaluate.out_dir), params.evaluate.band_width)
    print_table(results)


if __name__ == "__main__":
    main()
