"""Held-out benchmark: a model directory against classical inpainting on whole test photos.

    python bench/heldout.py [--params params.yaml] [--model DIR] [--every-bin] [--out DIR]

Scores `--model` (default `train.out_dir`), the same architecture untrained, and OpenCV's Telea
and Navier–Stokes at radius 3 and 5 on the held-out test photos at every `evaluate.sizes` short
side, with the evaluate stage's own pairs and scores (pipelines/evaluate.py on dfnet.evaluation),
so a number here means what the stage's number means. `--every-bin` scores each photo with every
bin's mask instead of the stage's one bin per photo: five times the work, five times the pairs.

Prints the per-size, per-bin table with the CPU and torch version it ran on; `--out DIR` also
writes DIR/heldout.md and the comparison grid DIR/heldout_grid.png.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from bench.quality import cpu_name  # noqa: E402
from dfnet.evaluation import comparison_grid  # noqa: E402
from dfnet.params import load_params  # noqa: E402
from pipelines.evaluate import OPENCV_RADII, evaluate_heldout, markdown_tables, stage_methods  # noqa: E402


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

    photos = ", ".join(f"{n} at {size} px" for size, n in heldout.photos.items())
    report = (
        f"# Held-out whole-photo benchmark\n\n"
        f"Model `{model_dir}` on the test photos of `{params.data.out_dir}` ({photos}), "
        f"{'every bin per photo' if args.every_bin else 'one bin per photo'}, mask seed "
        f"{params.evaluate.mask_seed}; BPE band {params.evaluate.band_width} px at 256. "
        f"l1 and BPE in percent of the 8-bit range, PSNR in dB, SSIM in [0, 1].\n\n"
        f"CPU: {cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}; {seconds:.0f} s.\n\n" + markdown_tables(heldout.results)
    )
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "heldout.md").write_text(report)
        if heldout.examples:
            comparison_grid(heldout.examples, list(methods)).save(args.out / "heldout_grid.png")


if __name__ == "__main__":
    main()
