"""DVC stage `evaluate`: the trained DFNet against baselines on whole held-out photos.

    python -m pipelines.evaluate [--params params.yaml]

For every short side in `evaluate.sizes`, up to `evaluate.max_photos` test photos (evenly spaced
over the split) are scaled to it, never cropped, and completed whole, the way users run the model
(dfnet.evaluation). The methods: the trained DFNet, the shipped model it was fine-tuned from,
the same architecture untrained (what training bought; with a pre-fill it returns exactly that
pre-fill), and OpenCV's Telea and Navier–Stokes at radius 3. Completions are 8-bit images,
as a user gets them.

Each photo is scored with one fixed mask, the bins cycling over the sorted photo keys, so every
bin gets a fifth of the photos. With 24 photos at 256 and 512 px this takes about a minute of
CPU (the two networks ~45%, scoring, mostly SSIM and BPE, ~35%, OpenCV ~20%; 80% of it at 512 px);
every photo with every bin's mask would take five times as long. `bench/heldout.py --every-bin`
does that, with radius 5 as well.

Writes metrics/eval.json (`dvc metrics show`: {method: {size: {bin: {metric}}, "mean": {metric}},
"settings": {...}}), metrics/eval_bins.csv (one row per size and bin), metrics/eval_metrics.png
(each metric against the hole ratio) and metrics/eval_grid.png (example photos of every size),
and prints one markdown table per size.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dfnet.data import load_photos
from dfnet.evaluation import (
    METRICS,
    PSNR_CAP_DB,
    Example,
    Method,
    bin_label,
    comparison_grid,
    dfnet_method,
    evaluate_methods,
    evaluation_pairs,
    mean_scores,
    opencv_method,
)
from dfnet.masks import HOLE_BINS
from dfnet.model import CONFIG_NAME, DFNet
from dfnet.params import Params
from dfnet.pretrained import pretrained_dir, resolve_model_dir
from pipelines import stage_params

__all__ = [
    "METRICS",
    "Heldout",
    "Results",
    "baseline_methods",
    "bin_label",
    "evaluate_heldout",
    "main",
    "markdown_tables",
    "overall_mean",
    "settings_of",
    "stage_methods",
    "summary",
    "write_reports",
]

log = logging.getLogger("dfnet.evaluate")
#: {method: {size: {bin label: {metric: mean}}}}, sizes as strings (JSON keys).
Results = dict[str, dict[str, dict[str, dict[str, float]]]]
#: OpenCV radii of `bench/heldout.py`. The stage scores radius 3 only: radius 5 costs over twice as
#: much at 512 px with large holes and scored within 2% of radius 3 on the sample photos.
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
    """The trained model in `model_dir`, the model shipped with the package (what fine-tuning
    started from; left out when `model_dir` is that model), the untrained network (seeded like
    training; with `model.prefill` it returns exactly its pre-fill) and the OpenCV baselines at
    `radii`: what the stage and `bench/heldout.py` compare."""
    torch.manual_seed(params.train.seed)
    untrained = params.model.build().eval()
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
        keys, photos = load_photos(params.data.out_dir, "test", size, ev.max_photos)
        # With under two photos per bin, cycling bins would leave bins empty or resting on one
        # photo (the 15 bundled photos give 2 test photos): then every photo meets every bin.
        all_bins = every_bin or len(keys) < 2 * len(HOLE_BINS)
        pairs = evaluation_pairs(dict(zip(keys, photos)), size, ev.mask_seed, every_bin=all_bins)
        per_bin, examples = evaluate_methods(methods, pairs, ev.band_width, examples=grid_rows)
        for name in methods:
            heldout.results[name][str(size)] = per_bin[name]
        heldout.examples.extend(examples)
        heldout.photos[str(size)] = len(keys)
    return heldout


def overall_mean(per_size: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """One method's metrics averaged over every size and bin: the number the registry compares."""
    return mean_scores(scores for bins in per_size.values() for scores in bins.values())


def summary(results: Results, settings: dict[str, Any]) -> dict[str, Any]:
    """eval.json: the results with each method's overall mean, and the settings that made them."""
    return {
        **{name: {**per_size, "mean": overall_mean(per_size)} for name, per_size in results.items()},
        "settings": settings,
    }


def _sizes(results: Results) -> list[str]:
    return list(next(iter(results.values())))


def markdown_tables(results: Results) -> str:
    """One markdown table per size: a row per method and metric, a column per bin and the mean."""
    methods = list(results)
    blocks = []
    for size in _sizes(results):
        labels = list(results[methods[0]][size])
        lines = [
            f"**{size} px short side**",
            "",
            f"| method | metric | {' | '.join(labels)} | mean |",
            "|---|---|" + "---:|" * (len(labels) + 1),
        ]
        for metric in METRICS:
            for name in methods:
                values = [results[name][size][label][metric] for label in labels]
                cells = " | ".join(f"{v:.3f}" for v in [*values, float(np.mean(values))])
                lines.append(f"| {name} | {metric} | {cells} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def write_reports(results: Results, examples: list[Example], out_dir: Path, settings: dict[str, Any]) -> None:
    """eval.json, eval_bins.csv, eval_metrics.png and eval_grid.png under `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(summary(results, settings), indent=2) + "\n")

    methods, sizes = list(results), _sizes(results)
    with open(out_dir / "eval_bins.csv", "w") as f:
        f.write("size,hole_ratio," + ",".join(f"{m}_{k}" for m in methods for k in METRICS) + "\n")
        for size in sizes:
            for label in results[methods[0]][size]:
                values = ",".join(f"{results[m][size][label][k]:.4f}" for m in methods for k in METRICS)
                f.write(f"{size},{label},{values}\n")

    styles = ["-", "--", ":", "-."]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.8))
    for ax, metric in zip(axes, METRICS):
        for m in methods:
            for s, size in enumerate(sizes):
                labels = list(results[m][size])
                ax.plot(labels, [results[m][size][b][metric] for b in labels], marker="o", markersize=3,
                        linestyle=styles[s % len(styles)], color=colours[m])  # fmt: skip
        ax.set(title=metric, xlabel="hole ratio")
        ax.tick_params(axis="x", labelrotation=30)
    handles = [Line2D([], [], color=colours[m], label=m) for m in methods]
    handles += [Line2D([], [], color="black", linestyle=styles[s % len(styles)], label=f"{size} px")
                for s, size in enumerate(sizes)]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out_dir / "eval_metrics.png", dpi=110)
    plt.close(fig)

    if examples:
        comparison_grid(examples, methods).save(out_dir / "eval_grid.png")


def settings_of(params: Params, heldout: Heldout) -> dict[str, Any]:
    """What eval.json records beside the numbers, so a reader knows what they measure."""
    return {
        "sizes_short_side_px": [int(s) for s in heldout.photos],
        "photos_per_size": heldout.photos,
        "max_photos": params.evaluate.max_photos,
        "mask_seed": params.evaluate.mask_seed,
        "bins": [bin_label(b) for b in range(len(HOLE_BINS))],
        "bpe_band_px_at_256": params.evaluate.band_width,
        "units": "l1 and bpe in percent of the 8-bit range, psnr in dB (capped), ssim in [0, 1]",
        "psnr_cap_db": PSNR_CAP_DB,
        "pairs": "one mask per photo, the bins cycling over the sorted keys",
        "opencv_radius": 3,
        "fid": "not computed: a few dozen whole photos per bin are far too few for FID",
    }


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    start = time.perf_counter()
    heldout = evaluate_heldout(params, stage_methods(params, params.train.out_dir), params.evaluate.grid_rows)
    write_reports(heldout.results, heldout.examples, Path(params.evaluate.out_dir), settings_of(params, heldout))
    log.info("evaluated %d methods in %.1fs", len(heldout.results), time.perf_counter() - start)
    print(markdown_tables(heldout.results))


if __name__ == "__main__":
    main()
