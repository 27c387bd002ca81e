"""Held-out benchmark: a model directory against classical inpainting on whole test photos.

    python bench/heldout.py [--params params.yaml] [--model DIR] [--every-bin] [--out DIR]

Scores the model, the untrained network and OpenCV at each of `OPENCV_RADII` with the evaluate
stage's own pairs and scores (dfnet.evaluation.evaluate_heldout), so a number here means what
the stage's number means; `--every-bin` gives every photo every bin's mask. Prints the tables and
the goal check: the large-hole cells where the model beats every other method of the run.
`--out DIR` also writes heldout.md, the comparison grid and the model's alpha maps there.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
from _common import cpu_name, plot_alphas  # bench/'s shared helpers

from dfnet.evaluation import OPENCV_RADII, Results, better, comparison_grid, evaluate_heldout, stage_methods
from dfnet.model import DFNet
from dfnet.params import load_params
from dfnet.reports import markdown_tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default=None, help="model directory (default: train.out_dir)")
    parser.add_argument("--every-bin", action="store_true", help="every photo with every bin's mask")
    parser.add_argument("--out", type=Path, default=None, help="folder for heldout.md and heldout_grid.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    model_dir = args.model or params.train.out_dir

    start = time.perf_counter()
    methods = stage_methods(params, model_dir, radii=OPENCV_RADII)
    heldout = evaluate_heldout(params, methods, params.evaluate.grid_rows, every_bin=args.every_bin)
    seconds = time.perf_counter() - start

    goal = goal_check(heldout.results)
    photos = ", ".join(f"{n} at {size} px" for size, n in heldout.photos.items())
    report = (
        f"# Held-out whole-photo benchmark\n\n"
        f"Model `{model_dir}` on the test photos of `{params.data.out_dir}` ({photos}), "
        f"{'every bin per photo' if args.every_bin else 'one bin per photo'}, mask seed "
        f"{params.evaluate.mask_seed}; BPE band {params.evaluate.band_width} px at 256. "
        f"l1 and BPE in percent of the 8-bit range, PSNR in dB, SSIM in [0, 1].\n\n"
        f"CPU: {cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}; {seconds:.0f} s.\n\n" + markdown_tables(heldout.results) + "\n" + goal
    )
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "heldout.md").write_text(report)
        if heldout.examples:
            comparison_grid(heldout.examples, list(methods)).save(args.out / "heldout_grid.png")
            smallest = min(e.pair.short_side for e in heldout.examples)
            pairs = [e.pair for e in heldout.examples if e.pair.short_side == smallest]
            plot_alphas(DFNet.from_pretrained(model_dir), pairs, args.out / "heldout_alphas.png")


def goal_check(results: Results, model: str = "dfnet", min_ratio: float = 0.2) -> str:
    """A markdown table: per size, bin from `min_ratio` up and metric (ℓ1, BPE), the model against
    the best other method of the run, and how many cells it wins."""
    lines = ["| size | bin | metric | model | best other | other method | model ahead |",
             "|---|---|---|---:|---:|---|---|"]  # fmt: skip
    wins = cells = 0
    for size, bins in results[model].items():
        for label, scores in bins.items():
            if int(label.split("-")[0]) < round(min_ratio * 100):
                continue
            for metric in ("l1", "bpe"):
                others = {name: r[size][label][metric] for name, r in results.items() if name != model}
                best = min(others, key=others.get)
                ahead = better(metric, scores[metric], others[best])
                wins, cells = wins + ahead, cells + 1
                lines.append(f"| {size} | {label} | {metric} | {scores[metric]:.3f} | {others[best]:.3f} | {best} | "
                             f"{'yes' if ahead else '**no**'} |")  # fmt: skip
    head = f"**Goal check:** `{model}` is below every other method in {wins} of {cells} cells (bins ≥ {min_ratio:.0%})."
    return head + "\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
